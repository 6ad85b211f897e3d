"""Forms of the CPU backbone forward against fp32: speed (interleaved rounds, best kept) and
cosine of the patch tokens, on real ecssd-dev images (docs/speed-report.md#precision-and-cuda).

Forms: ``fp32``; ``autocast`` (``torch.autocast`` bf16, the old ``--precision bf16``);
``cast`` (weights and input cast to bf16); ``cast+fused`` (what ``auto`` runs on a CPU with
native bf16: ``selfment_label.features.bf16_cpu``); ``cast+fused+math-attention`` (timm's
unfused attention instead of SDPA); ``int8-dynamic`` (``quantize_dynamic`` of the Linear
layers, the candidate for CPUs without bf16).

    python -m benchmarks.backbone_forms --images 8 --rounds 6
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

if not __package__:  # run as `python benchmarks/X.py`: import the checkout's benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_asset_arguments, load_backbone
from benchmarks.speed import decode_all, machine_facts
from selfment_label.config import DEFAULT_RESOLUTION
from selfment_label.data.batching import batches_by_grid, stack_pixels
from selfment_label.data.images import find_images
from selfment_label.features.backbone import Backbone
from selfment_label.features.bf16_cpu import bf16_cpu_model

Form = Callable[[torch.Tensor], torch.Tensor]


def forms(backbone: Backbone) -> dict[str, Form]:
    """Every form, as pixels -> ``forward_features`` output."""
    model = backbone.model
    cast = copy.deepcopy(model).to(torch.bfloat16)
    fused = bf16_cpu_model(model)
    math_attention = bf16_cpu_model(model)
    for block in math_attention.blocks:
        block.attn.fused_attn = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8
        )

    def autocast(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.forward_features(x)

    return {
        "fp32": model.forward_features,
        "autocast": autocast,
        "cast": lambda x: cast.forward_features(x.bfloat16()),
        "cast+fused": lambda x: fused.forward_features(x.bfloat16()),
        "cast+fused+math-attention": lambda x: math_attention.forward_features(x.bfloat16()),
        "int8-dynamic": int8.forward_features,
    }


@torch.inference_mode()
def measure(backbone: Backbone, batches: list[torch.Tensor], rounds: int) -> dict[str, dict]:
    """Best seconds over all batches per form (interleaved rounds) and token cosines."""
    candidates = forms(backbone)
    outputs = {name: [form(x).float() for x in batches] for name, form in candidates.items()}
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(rounds):
        for name, form in candidates.items():
            start = time.perf_counter()
            for x in batches:
                form(x)
            best[name] = min(best[name], time.perf_counter() - start)
    reference = torch.cat([o.flatten(0, 1) for o in outputs["fp32"]])
    report = {}
    for name in candidates:
        tokens = torch.cat([o.flatten(0, 1) for o in outputs[name]])
        cosine = F.cosine_similarity(tokens, reference, dim=-1)
        report[name] = {
            "seconds": round(best[name], 3),
            "speedup_vs_fp32": round(best["fp32"] / best[name], 3),
            "cosine_mean": round(float(cosine.mean()), 5),
            "cosine_min": round(float(cosine.min()), 4),
        }
    return report


def main() -> None:
    """Parse options, measure, print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_asset_arguments(parser)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    backbone = load_backbone(args.weights)
    images = args.data / "images"
    decoded = decode_all(images, find_images(images)[: args.images], args.resolution, backbone)
    stream = ((d.file_name, d) for d in decoded)
    grouped = batches_by_grid(stream, args.batch_size, window=2 * args.batch_size)
    batches = [stack_pixels(batch) for batch, _ in grouped if batch]
    report = measure(backbone, batches, args.rounds)
    facts = machine_facts(torch.device("cpu"))
    print(json.dumps({"machine": facts, "images": args.images, "forms": report}, indent=2))


if __name__ == "__main__":
    main()

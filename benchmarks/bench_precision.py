"""Backbone autocast precision: speed (bare backbone, same process) and quality (ecssd-dev).

For each precision the same first ``--images`` dev images are labelled with ``label_folder``
and evaluated against their ground truth with ``selfment_label.evaluate`` (pysodmetrics);
the bare backbone forward of every precision is timed in interleaved rounds in this one
process, so the speed ratio is fair on a busy machine.

    .venv/bin/python -m benchmarks.bench_precision --images 24 --precisions fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.speed import bare_backbone_seconds, decode_all, link_images
from selfment_label.config import DEFAULT_RESOLUTION, RunConfig
from selfment_label.data.images import find_images
from selfment_label.evaluate import evaluate_run
from selfment_label.features.backbone import build_backbone
from selfment_label.runfolder.pipeline import label_folder

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def main() -> None:
    """Parse options, measure, print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "ecssd-dev")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "dinov2_vits14.safetensors"))
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    backbone = build_backbone("dinov2-vits14", args.weights, "cpu", allow_download=False)
    images = args.data / "images"
    names = find_images(images)[: args.images]
    decoded = decode_all(images, names, args.resolution, backbone)
    bare = {p: float("inf") for p in args.precisions}
    for _ in range(args.rounds):
        for precision in args.precisions:
            seconds = bare_backbone_seconds(backbone, decoded, args.batch_size, precision)
            bare[precision] = min(bare[precision], seconds)
    report: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="selfment-precision-") as scratch:
        work = Path(scratch)
        subset, gt = work / "images", work / "gt"
        subset.mkdir()
        gt.mkdir()
        link_images(images, names, subset)
        link_images(args.data / "masks", [f"{Path(n).stem}.png" for n in names], gt)
        for precision in args.precisions:
            config = RunConfig(
                resolution=args.resolution, precision=precision, batch_size=args.batch_size
            )
            start = time.perf_counter()
            label_folder(subset, work / f"run-{precision}", config, backbone=backbone)
            seconds = time.perf_counter() - start
            metrics = evaluate_run(work / f"run-{precision}", gt).metrics
            report[precision] = {
                "bare_backbone_images_per_s": len(names) / bare[precision],
                "end_to_end_images_per_s": len(names) / seconds,
                "iou": metrics["iou"],
                "max_f": metrics["max_f"],
                "mae": metrics["mae"],
            }
    print(json.dumps({"images": len(names), "resolution": args.resolution, **report}, indent=2))


if __name__ == "__main__":
    main()

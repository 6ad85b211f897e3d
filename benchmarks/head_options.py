"""Which of the single head's options help? Blocks read, test-time flip, self-correction rounds,
the folder's size, and self-training on the folder it labels.

Measured on ecssd-dev with the tokens computed once (``--work``/tokens, resumable): for every
image the tokens of blocks 5, 8 and 11 (each after the final norm, bf16 as the default CPU
precision) of the image and of its mirror image (mirrored back). NCut+IPO runs on the block-11
tokens (as ``run`` does) and gives the pseudo-masks; heads are trained on them exactly as
``train`` trains (``head.model.head_losses``, ``TrainConfig``; rounds with
``head.train.correct_single_targets``'s rules) and evaluated as ``apply`` labels: full-size
soft maps through ``masks.full_size_masks`` with the default ``--refine guided``, scored by
``evaluate.SodMetrics`` (pysodmetrics) against the ground truth.

- ``features``: train on 0001-0100, evaluate on 0101-0200, for each way of reading the
  blocks, without and with flip;
- ``rounds``: 1 and 2 rounds at keep scores 0.7 and 0.9, seeds 0-2;
- ``sizes``: heads trained on the first 10, 20, 40 images;
- ``selftrain``: trained on all 200 and evaluated on the same 200 (the labelling use case);
- ``crossfit``: ``run --self-train`` as built: the 200 split by sorted name, alternating, a
  head (``TrainConfig()``: one round; and without rounds) trained on each half's
  pseudo-masks, each half labelled by the other half's head.

    python benchmarks/head_options.py --only features,rounds,sizes,selftrain,crossfit
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

if not __package__:  # run as `python benchmarks/X.py`: import the checkout's benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_asset_arguments, load_backbone
from selfment_label.config import RunConfig, TrainConfig
from selfment_label.data.images import prepare_image
from selfment_label.evaluate import SodMetrics, load_gt_mask
from selfment_label.head.instance_model import Prediction
from selfment_label.head.model import PatchHead, head_losses, mask_score, patch_targets
from selfment_label.head.rounds import correct_image
from selfment_label.masks import full_size_masks
from selfment_label.refine import guide_side
from selfment_label.segment.base import PatchMask
from selfment_label.segment.registry import make_segmenter
from selfment_label.timing import StageTimer

BLOCKS = (5, 8, 11)
READS: dict[str, Callable[[list[torch.Tensor]], torch.Tensor]] = {
    "block 11 (default)": lambda t: t[2],
    "blocks 8+11 side by side": lambda t: torch.cat(t[1:], -1),
    "blocks 5+8+11 side by side": lambda t: torch.cat(t, -1),
    "mean of blocks 5, 8, 11": lambda t: torch.stack(t).mean(0),
}
SHOWN = ("max_f", "iou", "accuracy", "mae")


def dump_tokens(data: Path, weights: Path, folder: Path, resolution: int) -> None:
    """Blocks' tokens of every image and of its mirror image (mirrored back), once."""
    folder.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(weights)
    for path in sorted((data / "images").glob("*.jpg")):
        out = folder / f"{path.stem}.pt"
        if out.exists():
            continue
        item = prepare_image(data / "images", path.name, resolution, 14, *backbone.mean_std)
        pixels = torch.from_numpy(item.pixels)[None]
        tokens = backbone.patch_tokens(torch.cat([pixels, pixels.flip(-1)]), torch.bfloat16, BLOCKS)
        blocks = tokens.reshape(*tokens.shape[:-1], len(BLOCKS), -1).half()
        record = {"plain": blocks[0], "mirror": blocks[1].flip(1)}
        torch.save({"width": item.width, "height": item.height, **record}, out)


class Study:
    """The tokens, guides, ground truth and pseudo-masks of every image, and the helpers."""

    def __init__(self, data: Path, tokens: Path, resolution: int) -> None:
        self.stems = sorted(p.stem for p in (data / "images").glob("*.jpg"))
        self.records = {s: torch.load(tokens / f"{s}.pt") for s in self.stems}
        side = guide_side("guided")
        self.guides = {
            s: prepare_image(
                data / "images", f"{s}.jpg", resolution, 14, (0,) * 3, (1,) * 3, guide_side=side
            ).guide
            for s in self.stems
        }
        self.gts = {s: load_gt_mask(data / "masks" / f"{s}.png") for s in self.stems}
        segmenter = make_segmenter(RunConfig().segment)
        self.pseudo = {}
        for s in self.stems:
            masks = segmenter(self.blocks(s, False)[2][None], StageTimer())[0]
            self.pseudo[s] = self.full_size(s, list(masks))
        self.targets = {
            s: patch_targets(self.pseudo[s] > 0.5, self.blocks(s, False)[2].shape[:2])
            for s in self.stems
        }

    def blocks(self, stem: str, mirror: bool) -> list[torch.Tensor]:
        blocks = self.records[stem]["mirror" if mirror else "plain"].float()
        return list(blocks.unbind(-2))

    def full_size(self, stem: str, masks: list[PatchMask]) -> np.ndarray:
        record = self.records[stem]
        _, union = full_size_masks(
            masks, record["width"], record["height"], "guided", self.guides[stem]
        )
        return np.zeros((record["height"], record["width"])) if union is None else union.numpy()

    def score(self, maps: dict[str, np.ndarray]) -> dict[str, float]:
        metrics = SodMetrics()
        for stem, soft in maps.items():
            metrics.step(soft, self.gts[stem])
        return {k: round(v, 4) for k, v in metrics.results().items() if k in SHOWN}


def train(study: Study, stems: list[str], read, targets, config: TrainConfig) -> PatchHead:
    """``head.train.train_head``'s loop on in-memory tokens."""
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = PatchHead(read(study.blocks(stems[0], False)).shape[-1])
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(config.epochs):
        order = torch.randperm(len(stems), generator=generator).tolist()
        for first in range(0, len(order), config.batch_size):
            batch = [stems[i] for i in order[first : first + config.batch_size]]
            tokens = [read(study.blocks(s, False)) for s in batch]
            flat = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens])
            target = torch.cat([targets[s].reshape(-1) for s in batch])
            index = torch.cat(
                [torch.full((t.numel(),), i) for i, t in enumerate(targets[s] for s in batch)]
            )
            loss = head_losses(head, flat, target, index, config, generator)["total"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head.eval()


@torch.no_grad()
def probability(study: Study, head: PatchHead, stem: str, read, flip: bool) -> torch.Tensor:
    logit = head.foreground_logit(read(study.blocks(stem, False)))
    if flip:
        logit = (logit + head.foreground_logit(read(study.blocks(stem, True)))) / 2
    return torch.sigmoid(logit)


def evaluate(study: Study, head: PatchHead, stems: list[str], read, flip: bool) -> dict:
    maps = {
        s: study.full_size(s, [PatchMask(probability(study, head, s, read, flip), 1.0)])
        for s in stems
    }
    return study.score(maps)


@torch.no_grad()
def corrected(study: Study, head: PatchHead, stems, read, targets, config: TrainConfig):
    """The targets after one round of ``correct_single_targets``'s rules, and the counts."""
    new, counts = {}, [0, 0, 0]
    for s in stems:
        p = probability(study, head, s, read, False)
        fixed, change = correct_image(
            targets[s][None], Prediction(p[None], mask_score(p[None])), config
        )
        new[s] = fixed.amax(0) if len(fixed) else torch.zeros_like(targets[s])
        counts = [counts[0] + change.replaced, counts[1] + change.dropped, counts[2] + change.added]
    return new, dict(zip(("replaced", "dropped", "added"), counts, strict=True))


def crossfit(study: Study, read) -> dict[str, dict]:
    """``run --self-train`` as built: halves by sorted name, alternating; a head trained on
    each half's pseudo-masks labels the other half. Without rounds and with the default one
    round, without and with flip; the default over seeds 0-2."""
    halves = (study.stems[0::2], study.stems[1::2])
    report = {}
    for name, config in (
        ("rounds 0", TrainConfig(rounds=0)),
        *((f"1 round, seed {seed}", TrainConfig(seed=seed)) for seed in range(3)),
    ):
        maps: dict[bool, dict[str, np.ndarray]] = {False: {}, True: {}}
        for fit, labelled in (halves, halves[::-1]):
            head = train(study, fit, read, study.targets, config)
            if config.rounds:
                targets, _ = corrected(study, head, fit, read, study.targets, config)
                head = train(study, fit, read, targets, config)
            for flip, s in ((flip, s) for flip in maps for s in labelled):
                p = probability(study, head, s, read, flip)
                maps[flip][s] = study.full_size(s, [PatchMask(p, 1.0)])
        for flip, scored in maps.items():
            report[f"cross-fit, {name}{', flip' if flip else ''}, all 200"] = study.score(scored)
    return report


def main() -> None:
    """Run the studies asked for and print a JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_asset_arguments(parser)
    parser.add_argument("--work", type=Path, default=Path("/tmp/selfment-head-options"))
    parser.add_argument("--resolution", type=int, default=448)
    parser.add_argument("--only", default="features,rounds,sizes,selftrain")
    args = parser.parse_args()
    studies = set(args.only.split(","))
    dump_tokens(args.data, args.weights, args.work / "tokens", args.resolution)
    study = Study(args.data, args.work / "tokens", args.resolution)
    train_half, test_half = study.stems[:100], study.stems[100:]
    last = READS["block 11 (default)"]
    report: dict[str, dict] = {
        "NCut+IPO (run) on 0101-0200": study.score({s: study.pseudo[s] for s in test_half}),
        "NCut+IPO (run) on all 200": study.score(study.pseudo),
    }
    if "features" in studies:
        for name, read in READS.items():
            head = train(study, train_half, read, study.targets, TrainConfig())
            for flip in (False, True):
                report[f"head, {name}, flip {flip}"] = evaluate(study, head, test_half, read, flip)
    if "rounds" in studies:
        for seed in (0, 1, 2):
            head0 = train(study, train_half, last, study.targets, TrainConfig(seed=seed))
            report[f"seed {seed}, rounds 0"] = evaluate(study, head0, test_half, last, False)
            for keep in (0.7, 0.9):
                config = TrainConfig(seed=seed, keep_score=keep)
                head, targets = head0, study.targets
                for round_index in (1, 2):
                    targets, counts = corrected(study, head, train_half, last, targets, config)
                    head = train(study, train_half, last, targets, config)
                    report[f"seed {seed}, rounds {round_index}, keep {keep}"] = {
                        **evaluate(study, head, test_half, last, False),
                        **counts,
                    }
    if "sizes" in studies:
        for size in (10, 20, 40):
            head = train(study, train_half[:size], last, study.targets, TrainConfig())
            report[f"trained on {size} images"] = evaluate(study, head, test_half, last, False)
    if "selftrain" in studies:
        start = time.perf_counter()
        head = train(study, study.stems, last, study.targets, TrainConfig())
        seconds = round(time.perf_counter() - start, 1)
        config = TrainConfig()
        targets, counts = corrected(study, head, study.stems, last, study.targets, config)
        rounded = train(study, study.stems, last, targets, config)
        for name, model in (("self-train, rounds 0", head), ("self-train, 1 round", rounded)):
            report[f"{name}, all 200"] = {
                **evaluate(study, model, study.stems, last, False),
                "train_seconds": seconds,
            }
            for half, stems in (("0001-0100", train_half), ("0101-0200", test_half)):
                report[f"{name}, {half}"] = evaluate(study, model, stems, last, False)
        report["self-train, 1 round, all 200"].update(counts)
        for half, stems in (("0001-0100", train_half), ("0101-0200", test_half)):
            report[f"NCut+IPO (run) on {half}"] = study.score({s: study.pseudo[s] for s in stems})
        maps = {}
        for fit, labelled in ((train_half, test_half), (test_half, train_half)):
            head = train(study, fit, last, study.targets, TrainConfig(rounds=0))
            for s in labelled:
                p = probability(study, head, s, last, False)
                maps[s] = study.full_size(s, [PatchMask(p, 1.0)])
        report["2-fold (each half labelled by the other's head), all 200"] = study.score(maps)
    if "crossfit" in studies:
        report.update(crossfit(study, last))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

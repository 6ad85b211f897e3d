"""Edge refinement on ecssd-dev: quality and cost of every ``--refine``, for `run` and the head.

Every image is decoded once (with the refinement's guide image), its backbone forward pass
is timed (batch 1), the segmenter makes its patch masks, and ``masks.full_size_masks`` turns
the same patch masks into full-size masks with each refinement in turn (``none``, ``guided``,
``crf`` when pydensecrf2 is installed), so the rows differ only in the refinement.

Sources of patch masks:
  run   NCut+IPO (``single`` mode, default options) on all 200 images;
  head  the ``benchmarks/head_ecssd.py`` split: ``run`` (default options, so ``--refine
        guided`` masks) and ``train`` (default options) on 0001-0100, the head applied to
        0101-0200.

Metrics, per source and refinement, against the ground truth: maxF (beta^2 0.3) and MAE
from the soft map (the refined soft union, i.e. what ``--save-scores`` writes) and IoU at 0.5,
through ``selfment_label.evaluate.SodMetrics`` (pysodmetrics); BF@3px, the boundary
F-measure of the masks at a 3-pixel tolerance (``selfment_label.evaluate.boundary_f_measure``),
averaged over images.

Cost, measured in this one process: ms/image of the backbone forward pass and of each
refinement (its ``full_size_masks`` time minus that of ``none`` on the same image), and their
ratio. ``--threads`` sets torch's threads for everything (default 1: on a machine shared with
other jobs, 2 threads make every small kernel wait on a descheduled thread, which blows up the
refinement's time far more than the backbone's; 1 thread charges both alike).

    .venv/bin/python -m benchmarks.refine_ecssd --figure docs/refine.png
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

if not __package__:  # run as `python benchmarks/X.py`: import the checkout's benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_asset_arguments, load_backbone
from benchmarks.head_ecssd import split_halves
from selfment_label.config import REFINE_MAX_SIDE, REFINE_METHODS, RunConfig
from selfment_label.data.images import DecodedImage, prepare_image
from selfment_label.evaluate import SodMetrics, boundary_f_measure, load_gt_mask
from selfment_label.features.backbone import Backbone
from selfment_label.head.apply import HeadSegmenter
from selfment_label.head.checkpoint import load_checkpoint
from selfment_label.head.train import distil
from selfment_label.masks import full_size_masks
from selfment_label.runfolder.label import label_folder
from selfment_label.segment.base import PatchMask
from selfment_label.segment.single import NcutIpo
from selfment_label.timing import StageTimer

FIGURE_STEMS = ("0025", "0075", "0125", "0175")
FIGURE_HEIGHT = 180

Segment = Callable[[torch.Tensor], list[PatchMask]]


@dataclass
class Scores:
    """Metrics of one source and refinement, accumulated image by image."""

    sod: SodMetrics = field(default_factory=SodMetrics)
    boundary: list[float] = field(default_factory=list)
    milliseconds: list[float] = field(default_factory=list)

    def row(self) -> dict[str, float]:
        """maxF, IoU, MAE, BF@3px and mean ms/image of ``full_size_masks``."""
        sod = self.sod.results()
        return {
            "max_f": round(sod["max_f"], 4),
            "iou": round(sod["iou"], 4),
            "mae": round(sod["mae"], 4),
            "bf3": round(float(np.mean(self.boundary)), 4),
            "masks_ms": float(np.mean(self.milliseconds)),
        }


def methods() -> list[str]:
    """The refinements this machine can run."""
    crf = importlib.util.find_spec("pydensecrf") is not None
    return [m for m in REFINE_METHODS if m != "crf" or crf]


def decode(images: Path, stem: str, backbone: Backbone, resolution: int) -> DecodedImage:
    """One ecssd-dev image, with the guide image every refinement needs."""
    mean, std = backbone.mean_std
    return prepare_image(
        images,
        f"{stem}.jpg",
        resolution,
        backbone.patch_size,
        mean,
        std,
        guide_side=REFINE_MAX_SIDE,
    )


def evaluate_source(
    data: Path,
    stems: list[str],
    backbone: Backbone,
    segment: Segment,
    resolution: int,
    figure: dict[str, dict[str, np.ndarray]],
) -> tuple[dict[str, Scores], list[float]]:
    """Score every refinement on ``stems``; returns per-method scores and backbone seconds."""
    scores = {m: Scores() for m in methods()}
    backbone_seconds = []
    for stem in stems:
        item = decode(data / "images", stem, backbone, resolution)
        gt = load_gt_mask(data / "masks" / f"{stem}.png")
        start = time.perf_counter()
        tokens = backbone.patch_tokens(torch.from_numpy(item.pixels[None]))
        backbone_seconds.append(time.perf_counter() - start)
        patch_masks = segment(tokens)
        for method, score in scores.items():
            start = time.perf_counter()
            kept, union = full_size_masks(patch_masks, item.width, item.height, method, item.guide)
            score.milliseconds.append(1000 * (time.perf_counter() - start))
            mask = np.zeros(gt.shape, bool)
            for region in kept:
                mask |= region.mask
            soft = np.zeros(gt.shape) if union is None else union.cpu().numpy()
            score.sod.step(soft, gt)
            score.boundary.append(boundary_f_measure(mask, gt))
            if stem in FIGURE_STEMS:
                figure.setdefault(stem, {})[method] = mask
    return scores, backbone_seconds


def report(scores: dict[str, Scores], backbone_seconds: list[float]) -> dict[str, dict]:
    """Rows per method, with the refinement's extra ms/image and its ratio to the backbone."""
    backbone_ms = 1000 * float(np.mean(backbone_seconds))
    base = scores["none"].row()["masks_ms"]
    rows = {}
    for method, score in scores.items():
        row = score.row()
        extra = row.pop("masks_ms") - base
        row["refine_ms"] = round(extra, 1) if method != "none" else 0.0
        row["backbone_ms"] = round(backbone_ms, 1)
        row["ratio"] = round(extra / backbone_ms, 3) if method != "none" else 0.0
        rows[method] = row
    return rows


def head_segmenter(data: Path, work: Path, weights: Path, backbone: Backbone) -> Segment:
    """Train the head_ecssd.py head (run + train on 0001-0100) and return it as a segmenter."""
    folders = split_halves(data, work)
    config = RunConfig(weights=str(weights))
    label_folder(folders["train"], work / "run-train-refine", config, backbone=backbone)
    result = distil(work / "run-train-refine", work / "head-refine.pt", backbone=backbone)
    loaded = load_checkpoint(result.checkpoint)
    segmenter = HeadSegmenter(loaded.head.to(backbone.device), loaded.sha256)
    return lambda tokens: segmenter(tokens, StageTimer())[0]


def draw_figure(
    data: Path, figure: dict[str, dict[str, np.ndarray]], shown: list[str], out: Path
) -> None:
    """Rows of: image, then the mask of each refinement in ``shown`` (red fill, ground-truth
    boundary in green, IoU and BF@3px in the caption)."""
    rows = []
    for stem in FIGURE_STEMS:
        if stem not in figure:
            continue
        with Image.open(data / "images" / f"{stem}.jpg") as opened:
            image = np.asarray(opened.convert("RGB"))
        gt = load_gt_mask(data / "masks" / f"{stem}.png")
        edge = gt & ~ndimage.binary_erosion(gt, iterations=2)
        tiles = [(image, f"{stem} image")]
        for method in shown:
            mask = figure[stem][method]
            tile = image // 3
            tile[mask] = (0.45 * image[mask] + 0.55 * np.array([255, 40, 40])).astype(np.uint8)
            tile[edge] = (0, 255, 0)
            iou = (mask & gt).sum() / max(1, (mask | gt).sum())
            caption = f"--refine {method}: IoU {iou:.2f} BF@3px {boundary_f_measure(mask, gt):.2f}"
            tiles.append((tile, caption))
        scaled = []
        for tile, caption in tiles:
            shown_tile = Image.fromarray(tile)
            width = round(shown_tile.width * FIGURE_HEIGHT / shown_tile.height)
            shown_tile = shown_tile.resize((width, FIGURE_HEIGHT), Image.Resampling.LANCZOS)
            draw = ImageDraw.Draw(shown_tile)
            draw.rectangle((0, 0, shown_tile.width, 12), fill=(0, 0, 0))
            draw.text((3, 0), caption, fill=(255, 255, 255))
            scaled.append(shown_tile)
        row = Image.new("RGB", (sum(t.width + 4 for t in scaled), FIGURE_HEIGHT), "white")
        x = 0
        for tile in scaled:
            row.paste(tile, (x, 0))
            x += tile.width + 4
        rows.append(row)
    canvas = Image.new(
        "RGB", (max(r.width for r in rows), len(rows) * (FIGURE_HEIGHT + 4)), "white"
    )
    for index, row in enumerate(rows):
        canvas.paste(row, (0, index * (FIGURE_HEIGHT + 4)))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)


def print_table(name: str, rows: dict[str, dict]) -> None:
    """One Markdown table per source."""
    print(f"\n{name}")
    print("| --refine | maxF | IoU | MAE | BF@3px | refine ms/image | backbone ms/image | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for method, r in rows.items():
        print(
            f"| {method} | {r['max_f']:.4f} | {r['iou']:.4f} | {r['mae']:.4f} | {r['bf3']:.4f} "
            f"| {r['refine_ms']:.1f} | {r['backbone_ms']:.1f} | {r['ratio']:.3f} |"
        )


def main() -> None:
    """Run the benchmark, print the tables and a JSON report, draw the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_asset_arguments(parser)
    parser.add_argument("--work", type=Path, default=Path("/tmp/selfment-refine-bench"))
    parser.add_argument("--resolution", type=int, default=RunConfig.resolution)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default).")
    parser.add_argument("--every", type=int, default=1, help="Only every n-th image.")
    parser.add_argument("--no-head", action="store_true", help="Only the `run` source.")
    parser.add_argument("--figure", type=Path, default=None, help="Draw the picture here.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the report here.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = load_backbone(args.weights)
    stems = [f"{i:04d}" for i in range(1, 201)][:: args.every]
    figure: dict[str, dict[str, np.ndarray]] = {}
    run_scores, run_seconds = evaluate_source(
        args.data,
        stems,
        backbone,
        lambda tokens: NcutIpo()(tokens, StageTimer())[0],
        args.resolution,
        figure,
    )
    results = {"run (NCut+IPO, 0001-0200)": report(run_scores, run_seconds)}
    if not args.no_head:
        head = head_segmenter(args.data, args.work, args.weights, backbone)
        test = [s for s in stems if int(s) > 100]
        head_scores, head_seconds = evaluate_source(
            args.data, test, backbone, head, args.resolution, {}
        )
        results["head (apply, 0101-0200)"] = report(head_scores, head_seconds)
    for name, rows in results.items():
        print_table(name, rows)
    meta = {"threads": torch.get_num_threads(), "resolution": args.resolution}
    text = json.dumps({**meta, "results": results}, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    if args.figure and figure:
        draw_figure(args.data, figure, methods(), args.figure)
    elif args.figure:
        print(f"no figure: none of {', '.join(FIGURE_STEMS)} was evaluated (--every)")


if __name__ == "__main__":
    main()

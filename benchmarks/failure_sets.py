"""Failure sets from ecssd-dev: close-ups, a large uniform band, thin images; IoU per set.

Three kinds of ordinary photos that a one-object labeller gets wrong are made from ecssd-dev
images (with their ground truth transformed alike), written to a temporary folder at run time
(no image is kept or committed), labelled with the library's ``label_folder`` at the defaults
(the code of ``selfment-label run``) and evaluated with ``selfment_label.evaluate``:

- ``original``: the source images themselves (the reference of the other sets);
- ``closeup``: the largest crop about the ground-truth box (the box scaled about its centre,
  cutting into the object when needed) in which the object fills 60 %, 75 % or 90 % of the
  frame (in turn): a close-up whose subject touches the frame;
- ``band``: the image at the bottom of a canvas as wide and 1.8x as high, the rest a smooth
  uniform band (sky, dusk, wall or floor colours with mild noise) touching the top, left and
  right edges (44 % of the canvas), as a sky above the ground: the photo below it touches
  more than half of the frame's border;
- ``thin8`` / ``thin13``: the image squeezed to an 8:1 or 13:1 aspect ratio (landscape
  images flattened, portrait ones narrowed).

Per set it prints the mean IoU, accuracy and maxF, the images that got no mask, and the
images whose mask is the background ("background chosen": IoU with the inverted ground
truth > 0.5). ``--json`` writes the figures; ``--compare`` prints a run's figures beside
those of an earlier ``--json`` (e.g. made on main: ``PYTHONPATH=/work/main python ...``).

    python -m benchmarks.failure_sets --limit 60 --json after.json --compare before.json
    python -m benchmarks.failure_sets --limit 60 --precision fp32   # as on a CPU without bf16
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

if not __package__:  # run as `python benchmarks/X.py`: import the checkout's benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_asset_arguments, load_backbone, require_assets
from selfment_label.config import PRECISION_NAMES, REFINE_METHODS, RunConfig
from selfment_label.evaluate import evaluate_run, load_gt_mask
from selfment_label.runfolder.label import label_folder

CLOSEUP_FILLS = (0.6, 0.75, 0.9)
CLOSEUP_SCALES = np.linspace(1.2, 0.3, 37)
BAND_HEIGHT = 1.8
BAND_COLOURS = (
    ((120, 170, 230), (200, 225, 250)),  # clear sky
    ((70, 60, 110), (240, 150, 90)),  # dusk
    ((200, 196, 188), (180, 176, 168)),  # wall
    ((150, 120, 90), (120, 95, 70)),  # wooden floor
)
BAND_NOISE = 3.0
BACKGROUND_IOU = 0.5
SETS = ("original", "closeup", "band", "thin8", "thin13")

Transform = Callable[[Image.Image, np.ndarray, int], tuple[Image.Image, np.ndarray]]


def gt_box(gt: np.ndarray) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a boolean mask's foreground (exclusive ends)."""
    ys, xs = np.nonzero(gt)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _span(low: int, high: int, length: int, size: int) -> tuple[int, int]:
    # a window of ``length`` centred on [low, high), shifted to lie inside [0, size)
    length = min(size, length)
    start = min(max(0, (low + high - length) // 2), size - length)
    return start, start + length


def _crop_box(gt: np.ndarray, scale: float) -> tuple[int, int, int, int]:
    # the ground-truth box scaled by ``scale`` about its centre, kept inside the image
    left, top, right, bottom = gt_box(gt)
    x0, x1 = _span(left, right, max(1, round((right - left) * scale)), gt.shape[1])
    y0, y1 = _span(top, bottom, max(1, round((bottom - top) * scale)), gt.shape[0])
    return x0, y0, x1, y1


def closeup(image: Image.Image, gt: np.ndarray, index: int) -> tuple[Image.Image, np.ndarray]:
    """The largest crop about the ground-truth box in which the object fills at least
    ``CLOSEUP_FILLS[index % 3]`` of the frame (the fullest crop when none reaches it)."""
    fill = CLOSEUP_FILLS[index % len(CLOSEUP_FILLS)]
    best, best_share = (0, 0, gt.shape[1], gt.shape[0]), -1.0
    for scale in CLOSEUP_SCALES:
        x0, y0, x1, y1 = _crop_box(gt, scale)
        share = float(gt[y0:y1, x0:x1].mean())
        if share >= fill:
            best = (x0, y0, x1, y1)
            break
        if share > best_share:
            best, best_share = (x0, y0, x1, y1), share
    x0, y0, x1, y1 = best
    return image.crop(best), gt[y0:y1, x0:x1]


def band(
    image: Image.Image, gt: np.ndarray, index: int, height_factor: float = BAND_HEIGHT
) -> tuple[Image.Image, np.ndarray]:
    """The image at the bottom of a canvas ``height_factor`` x as high, whose top is a smooth
    uniform band."""
    width, height = image.size
    canvas_w, canvas_h = width, round(height * height_factor)
    top, bottom = (np.asarray(c, dtype=np.float32) for c in BAND_COLOURS[index % 4])
    ramp = np.linspace(0.0, 1.0, canvas_h, dtype=np.float32)[:, None, None]
    noise = np.random.default_rng(index).normal(0.0, BAND_NOISE, (canvas_h, canvas_w, 3))
    pixels = np.broadcast_to(top + (bottom - top) * ramp, (canvas_h, canvas_w, 3)) + noise
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    canvas.paste(image, (0, canvas_h - height))
    mask = np.zeros((canvas_h, canvas_w), dtype=bool)
    mask[canvas_h - height :] = gt
    return canvas, mask


def squeezer(ratio: int) -> Transform:
    """A transform squeezing an image to ``ratio``:1 along its short side."""

    def squeeze(image: Image.Image, gt: np.ndarray, index: int) -> tuple[Image.Image, np.ndarray]:
        width, height = image.size
        size = (width, round(width / ratio)) if width >= height else (round(height / ratio), height)
        mask = Image.fromarray(gt).resize(size, Image.Resampling.NEAREST)
        return image.resize(size, Image.Resampling.BICUBIC), np.asarray(mask)

    return squeeze


TRANSFORMS: dict[str, Transform] = {
    "original": lambda image, gt, index: (image, gt),
    "closeup": closeup,
    "band": band,
    "thin8": squeezer(8),
    "thin13": squeezer(13),
}


def make_set(name: str, data: Path, limit: int, out: Path) -> Path:
    """Write set ``name`` of the first ``limit`` images (0: all) of ``data`` under ``out``:
    ``images/``, ``masks/`` and ``inverted/`` (the ground truth's complement)."""
    folders = {kind: out / kind for kind in ("images", "masks", "inverted")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((data / "images").iterdir())
    for index, path in enumerate(sources[:limit] if limit else sources):
        gt = load_gt_mask(next((data / "masks").glob(f"{path.stem}.*")))
        with Image.open(path) as opened:
            image, mask = TRANSFORMS[name](opened.convert("RGB"), gt, index)
        image.save(folders["images"] / f"{path.stem}.png")
        for kind, values in (("masks", mask), ("inverted", ~mask)):
            Image.fromarray(values.astype(np.uint8) * 255).save(folders[kind] / f"{path.stem}.png")
    return out


def evaluate_set(folder: Path, run: Path) -> dict[str, float]:
    """Mean IoU / accuracy, maxF, images without a mask and "background chosen" of one set."""
    report = evaluate_run(run, folder / "masks")
    inverted = evaluate_run(run, folder / "inverted")
    ious = [row.metrics["iou"] for row in report.rows]
    coco = json.loads((run / "annotations.json").read_text())
    masked = {annotation["image_id"] for annotation in coco["annotations"]}
    return {
        "images": len(ious),
        "iou": float(np.mean(ious)),
        "accuracy": report.metrics["accuracy"],
        "max_f": report.metrics["max_f"],
        "background chosen": sum(row.metrics["iou"] > BACKGROUND_IOU for row in inverted.rows),
        "no mask": len(coco["images"]) - len(masked),
        "per_image_iou": {row.name: row.metrics["iou"] for row in report.rows},
    }


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    defaults = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_asset_arguments(parser)
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--refine", choices=REFINE_METHODS, default=defaults.refine)
    parser.add_argument("--precision", choices=PRECISION_NAMES, default=defaults.precision)
    parser.add_argument("--limit", type=int, default=0, help="Use only the first N images.")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--work", type=Path, default=None, help="Keep the sets and runs here.")
    parser.add_argument("--json", type=Path, default=None, help="Write the figures here.")
    parser.add_argument("--compare", type=Path, default=None, help="Earlier --json to compare.")
    return parser.parse_args()


def print_results(results: dict[str, dict], before: dict[str, dict] | None) -> None:
    """One row per set: this run's figures, after an earlier run's (``before -> now``)."""
    table = Table(title="failure sets (ecssd-dev)" + (": before -> now" if before else ""))
    table.add_column("set", style="bold")
    keys = ("images", "iou", "accuracy", "max_f", "background chosen", "no mask")
    for key in keys:
        table.add_column(key, justify="right")
    for name, figures in results.items():
        earlier = (before or {}).get(name)
        cells = [
            _cell(figures[key])
            if earlier is None or key == "images"
            else f"{_cell(earlier.get(key))} -> {_cell(figures[key])}"
            for key in keys
        ]
        table.add_row(name, *cells)
    Console(width=120).print(table)


def _cell(value: float | int | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def main() -> None:
    """Make the sets, label and evaluate each, print."""
    args = parse_args()
    require_assets(args.data, args.weights)
    work = args.work or Path(tempfile.mkdtemp(prefix="failure-sets-"))
    backbone = load_backbone(args.weights)
    config = RunConfig(
        resolution=args.resolution,
        refine=args.refine,
        precision=args.precision,
        save_scores=True,
    )
    results = {}
    for name in args.sets:
        folder = make_set(name, args.data, args.limit, work / name)
        run = work / f"run-{name}"
        label_folder(folder / "images", run, config, overwrite=True, backbone=backbone)
        results[name] = evaluate_set(folder, run)
    before = json.loads(args.compare.read_text()) if args.compare else None
    print_results(results, before)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

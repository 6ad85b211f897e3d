"""Quality bar: label ecssd-dev with NCut only and with NCut+IPO, then evaluate both.

Runs the library's ``label_folder`` (the same code as ``selfment-label run``, with
``--save-scores`` so the threshold-sweep metrics see the soft maps) on every image of
``../shared/data/ecssd-dev/images`` with the shared DINOv2 ViT-S/14 weights, evaluates each
run against ``masks/`` with ``selfment_label.evaluate`` and prints the metrics side by side,
then the seconds per image of every stage (from each run's ``run.json``).

    .venv/bin/python benchmarks/eval_ecssd.py                    # all 200 images, defaults
    .venv/bin/python benchmarks/eval_ecssd.py --limit 40 --resolution 518 --tau 0.2
    .venv/bin/python benchmarks/eval_ecssd.py --refine none       # the Quality table's figures
    .venv/bin/python benchmarks/eval_ecssd.py --ipo-only --precision fp32  # gate of auto
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import mannwhitneyu, spearmanr

if not __package__:  # run as `python benchmarks/X.py`: import the checkout's benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_asset_arguments, load_backbone, require_assets
from selfment_label.config import PRECISION_NAMES, REFINE_METHODS, RunConfig, SingleConfig
from selfment_label.evaluate import METRIC_NAMES, EvalReport, evaluate_run
from selfment_label.runfolder.label import label_folder
from selfment_label.runfolder.layout import ANNOTATIONS_NAME, RUN_NAME


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    defaults = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_asset_arguments(parser)
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--tau", type=float, default=SingleConfig.tau)
    parser.add_argument("--ipo-iters", type=int, default=SingleConfig.ipo_iters)
    parser.add_argument("--refine", choices=REFINE_METHODS, default=defaults.refine)
    parser.add_argument("--precision", choices=PRECISION_NAMES, default=defaults.precision)
    parser.add_argument(
        "--ipo-only", action="store_true", help="Only the NCut+IPO run (the default labelling)."
    )
    parser.add_argument("--limit", type=int, default=0, help="Use only the first N images.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default).")
    parser.add_argument("--work", type=Path, default=None, help="Keep the run folders here.")
    parser.add_argument("--json", type=Path, default=None, help="Also write results here.")
    return parser.parse_args()


def subset(data: Path, limit: int, work: Path) -> tuple[Path, Path]:
    """``(images, masks)`` folders: the dataset's, or symlinks to its first ``limit`` pairs."""
    images, masks = data / "images", data / "masks"
    if not limit:
        return images, masks
    for folder in ("images", "masks"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    for path in sorted(images.iterdir())[:limit]:
        for source in (path, *masks.glob(f"{path.stem}.*")):
            link = work / source.parent.name / source.name
            if not link.exists():
                link.symlink_to(source.resolve())
    return work / "images", work / "masks"


def main() -> None:
    """Label, evaluate and print."""
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    require_assets(args.data, args.weights)
    work = args.work or Path(tempfile.mkdtemp(prefix="eval-ecssd-"))
    images, masks = subset(args.data, args.limit, work)
    backbone = load_backbone(args.weights)
    variants = {"NCut only": 0, "NCut+IPO": args.ipo_iters}
    if args.ipo_only:
        del variants["NCut only"]
    results = {}
    for name, iters in variants.items():
        config = RunConfig(
            resolution=args.resolution,
            segment=SingleConfig(tau=args.tau, ipo_iters=iters),
            save_scores=True,
            refine=args.refine,
            precision=args.precision,
        )
        out = work / f"run-ipo{iters}"
        label_folder(images, out, config, overwrite=True, backbone=backbone)
        report = evaluate_run(out, masks)
        run = json.loads((out / RUN_NAME).read_text())
        labelled = max(run["images_labelled"], 1)
        results[name] = {
            **report.as_dict(),
            "seconds_per_image": {s: t / labelled for s, t in run["stage_seconds"].items()},
            "wall_seconds_per_image": run["seconds"] / labelled,
            "options": run["options"],
            "score": score_quality(out, report),
        }
    print_results(results, images)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def score_quality(run_dir: Path, report: EvalReport) -> dict[str, float]:
    """How well the mask score finds bad masks: Spearman with the image's IoU and the AUROC of
    a low score for masks with IoU < 0.5 (best-scored mask per image; images with none and
    no_object images left out), and how many images got no mask."""
    coco = json.loads((run_dir / ANNOTATIONS_NAME).read_text())
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    best: dict[str, float] = {}
    for annotation in coco["annotations"]:
        name = names[annotation["image_id"]]
        best[name] = max(best.get(name, 0.0), annotation["score"])
    pairs = [(best[r.prediction], r.metrics["iou"]) for r in report.rows if r.prediction in best]
    quality: dict[str, float] = {"images without a mask": len(names) - len(best)}
    if len(pairs) < 2:
        return quality
    scores, ious = (np.array(values) for values in zip(*pairs, strict=True))
    bad = ious < 0.5
    quality["masks with IoU < 0.5"] = int(bad.sum())
    quality["score Spearman with IoU"] = float(spearmanr(scores, ious).statistic)
    if bad.any() and not bad.all():
        statistic = mannwhitneyu(scores[~bad], scores[bad]).statistic
        quality["score AUROC for IoU < 0.5"] = float(statistic / (bad.sum() * (~bad).sum()))
    return quality


def print_results(results: dict[str, dict], images: Path) -> None:
    """The metrics and the per-stage timings, one column per variant."""
    console = Console()
    table = Table(title=f"ecssd-dev quality ({images})")
    table.add_column("metric", style="bold")
    for name in results:
        table.add_column(name, justify="right")
    for metric in METRIC_NAMES:
        table.add_row(metric, *(f"{r['metrics'][metric]:.4f}" for r in results.values()))
    table.add_row("images evaluated", *(str(r["images_evaluated"]) for r in results.values()))
    for key in dict.fromkeys(k for r in results.values() for k in r["score"]):
        cells = [f"{r['score'].get(key, float('nan')):.4g}" for r in results.values()]
        table.add_row(key, *cells)
    stages = dict.fromkeys(s for r in results.values() for s in r["seconds_per_image"])
    for stage in (*stages, "wall"):
        key = "wall_seconds_per_image" if stage == "wall" else None
        cells = [
            f"{r[key] if key else r['seconds_per_image'].get(stage, 0.0):.3f}"
            for r in results.values()
        ]
        table.add_row(f"{stage} s/image", *cells)
    console.print(table)


if __name__ == "__main__":
    main()

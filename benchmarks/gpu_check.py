"""The CUDA check: speed per resolution, batch size and precision, peak GPU memory, and masks
on the GPU against the CPU's, printed as one table (``benchmarks/gpu_check.sh`` runs it).

    python -m benchmarks.gpu_check                      # on a CUDA machine (a few minutes)
    python -m benchmarks.gpu_check --device cpu --quick # the same code on the CPU, tiny sizes

Every speed figure is an interleaved ``run_bench`` round (bare fp32 backbone, then each
precision's bare backbone and ``label_folder`` run), so the ratios are fair on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

if not __package__:  # run as `python benchmarks/X.py`: import the checkout's benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_asset_arguments, load_backbone
from benchmarks.bench_precision import mask_ious
from benchmarks.speed import BenchConfig, link_images, machine_facts, run_bench
from selfment_label.config import PRECISION_NAMES, RunConfig
from selfment_label.data.images import find_images
from selfment_label.device import resolve_device
from selfment_label.runfolder.label import label_folder

FULL = {"resolutions": (448, 896), "batch_sizes": (1, 8, 32), "limit": 64, "masks": 50}
QUICK = {"resolutions": (112,), "batch_sizes": (2,), "limit": 4, "masks": 2}
COLUMNS = ("resolution", "batch", "precision", "bare img/s", "run img/s", "run / bare fp32")
CONCRETE = tuple(name for name in PRECISION_NAMES if name != "auto")


def speed_rows(args: argparse.Namespace, sizes: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per resolution, batch size and precision (``run_bench``, interleaved)."""
    backbone = load_backbone(args.weights, args.device)
    rows = []
    for batch_size in sizes["batch_sizes"]:
        config = BenchConfig(
            images=args.data / "images",
            weights=str(args.weights),
            device=args.device,
            resolutions=sizes["resolutions"],
            batch_size=batch_size,
            precisions=(*CONCRETE, "auto"),
            limit=sizes["limit"],
            rounds=args.rounds,
            ncut=False,
            rss_counts=(),
        )
        for result in run_bench(config, backbone=backbone).throughput:
            for name, run in result.runs.items():
                rows.append(
                    {
                        "resolution": result.resolution,
                        "batch": batch_size,
                        "precision": f"{name} ({run.used})",
                        "bare_ips": run.bare_ips,
                        "run_ips": run.end_to_end_ips,
                        "run_over_bare_fp32": result.ratio(name),
                        "peak_gpu_mib": run.peak_gpu_mib,
                    }
                )
    return rows


def mask_rows(args: argparse.Namespace, count: int, work: Path) -> list[dict[str, Any]]:
    """Masks on ``args.device`` at each precision against the CPU's fp32 masks."""
    images = work / "images"
    images.mkdir()
    link_images(args.data / "images", find_images(args.data / "images")[:count], images)
    cpu = work / "cpu-fp32"
    on_cpu = load_backbone(args.weights)
    label_folder(images, cpu, RunConfig(device="cpu", precision="fp32"), backbone=on_cpu)
    backbone = load_backbone(args.weights, args.device)
    rows = []
    for precision in (*CONCRETE, "auto"):
        out = work / f"{args.device}-{precision}"
        config = RunConfig(device=args.device, precision=precision)
        label_folder(images, out, config, backbone=backbone)
        ious = list(mask_ious(cpu, out).values())
        rows.append(
            {
                "precision": precision,
                "images": len(ious),
                "min_iou": min(ious),
                "identical": sum(iou == 1.0 for iou in ious),
                "at_least_0.999": sum(iou >= 0.999 for iou in ious),
            }
        )
    return rows


def print_table(facts: dict[str, Any], speed: list[dict[str, Any]], masks: list[dict]) -> None:
    """The check's one table (speed rows, then mask rows)."""
    console = Console(width=160)
    console.print(f"{facts['device_name']} ({facts['device']}), torch {facts['torch']}")
    table = Table(title="gpu_check: images/s, ratio to the bare fp32 backbone, masks vs CPU fp32")
    for column in (
        "resolution",
        "batch",
        "precision",
        "bare img/s",
        "run img/s",
        "run / bare fp32",
    ):
        table.add_column(column, justify="right")
    table.add_column("peak GPU MiB / masks vs CPU", justify="right")
    for row in speed:
        peak = row["peak_gpu_mib"]
        table.add_row(
            str(row["resolution"]),
            str(row["batch"]),
            row["precision"],
            f"{row['bare_ips']:.2f}",
            f"{row['run_ips']:.2f}",
            f"{row['run_over_bare_fp32']:.3f}",
            "-" if peak is None else f"{peak:.0f}",
        )
    for row in masks:
        table.add_row(
            "masks",
            "",
            row["precision"],
            "",
            "",
            "",
            f"{row['images']} images: min IoU {row['min_iou']:.4f}, "
            f"{row['at_least_0.999']} >= 0.999, {row['identical']} identical",
        )
    console.print(table)


def main() -> None:
    """Parse options, measure, print the table (and the JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    add_asset_arguments(parser)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="Tiny sizes (a smoke run).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args()
    device = resolve_device(args.device)
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="selfment-gpu-check-") as scratch:
        speed = speed_rows(args, sizes)
        masks = mask_rows(args, sizes["masks"], Path(scratch))
    facts = machine_facts(device)
    print_table(facts, speed, masks)
    if args.json:
        args.json.write_text(json.dumps({"machine": facts, "speed": speed, "masks": masks}))


if __name__ == "__main__":
    main()

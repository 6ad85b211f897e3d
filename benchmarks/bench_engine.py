"""Speed benchmark of the engine: per-stage speed, end-to-end vs bare backbone, memory, targets.

Without arguments it measures the shared dev set with the shared backbone:

    .venv/bin/python benchmarks/bench_engine.py
    .venv/bin/python benchmarks/bench_engine.py IMAGES --weights FILE --resolution 448 --no-rss
    .venv/bin/python benchmarks/bench_engine.py --device cuda --precision fp32 --precision fp16
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.table import Table

if not __package__:  # run as `python benchmarks/X.py`: import the checkout's benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfment_label_cli.console import (
    console,
    require_choice,
    setup_logging,
    user_errors,
)

from benchmarks._common import ECSSD, WEIGHTS
from benchmarks.speed import DEFAULT_RSS_RESOLUTION, BenchConfig, BenchReport, run_bench
from selfment_label.config import (
    DEFAULT_BACKBONE,
    DEFAULT_RESOLUTION,
    DEVICE_HELP,
    PRECISION_NAMES,
    RunConfig,
)
from selfment_label.features.presets import WEIGHTS_ENV, BackboneError


def throughput_table(report: BenchReport) -> Table:
    """One column per resolution and precision: stage costs, images/s, ratio to bare fp32."""
    table = Table(title="throughput (decode runs in worker threads, overlapped)")
    table.add_column("measure")
    columns = [(t, name) for t in report.throughput for name in t.runs]
    for t, name in columns:
        table.add_column(f"{t.resolution} px {name} ({t.runs[name].used})", justify="right")
    table.add_row("images per round", *[str(t.images) for t, _ in columns])
    stages = dict.fromkeys(s for t, name in columns for s in t.runs[name].stage_ms)
    for stage in stages:
        table.add_row(
            f"{stage} ms/image",
            *[f"{t.runs[name].stage_ms.get(stage, 0.0):.1f}" for t, name in columns],
        )
    table.add_row("end-to-end images/s", *[f"{t.runs[n].end_to_end_ips:.3f}" for t, n in columns])
    table.add_row("bare backbone images/s", *[f"{t.runs[n].bare_ips:.3f}" for t, n in columns])
    table.add_row("bare fp32 backbone images/s", *[f"{t.bare_fp32_ips:.3f}" for t, _ in columns])
    table.add_row("end-to-end / bare fp32", *[f"{t.ratio(n):.3f}" for t, n in columns])
    return table


def print_report(report: BenchReport) -> None:
    """Machine, throughput per resolution, NCut check, memory and targets as rich tables."""
    machine = report.machine
    console.print(
        f"[bold]machine[/]: {machine['device_name']} ({machine['device']}), "
        f"{machine['cpu_cores']} cores ({machine['usable_cores']} usable), "
        f"torch {machine['torch']} with {machine['torch_threads']} threads, "
        f"load average {machine['load_average']}"
    )
    if report.throughput:
        console.print(throughput_table(report))
    if report.ncut:
        n = report.ncut
        console.print(
            f"[bold]NCut[/] at {n['patches']} patches: ours {n['ours_ms']:.1f} ms "
            f"({n['iterations']} block products), scipy eigh {n['scipy_ms']:.1f} ms, "
            f"speedup {n['speedup']:.1f}x, |cos| {n['cos']:.5f}"
        )
    if report.rss:
        runs = ", ".join(
            f"{count} images: {r['peak_rss_mb']:.0f} MiB" for count, r in report.rss["runs"].items()
        )
        console.print(f"[bold]peak RSS[/] at {report.rss['resolution']} px: {runs}")
    targets = Table(title="targets")
    targets.add_column("target")
    targets.add_column("measured", justify="right")
    targets.add_column("bound", justify="right")
    targets.add_column("result")
    targets.add_column("how")
    for target in report.targets:
        sign = ">=" if target.higher_is_better else "<="
        verdict = "[green]PASS[/]" if target.passed else "[red]FAIL[/]"
        targets.add_row(
            target.name,
            f"{target.measured:.3f}",
            f"{sign} {target.bound}",
            verdict,
            target.detail,
        )
    console.print(targets)
    console.print(f"bench process peak RSS: {report.peak_rss_mb:.0f} MiB")


def bench(
    images: Path = typer.Argument(
        ECSSD / "images", help="Folder of real images (the first --limit are used)."
    ),
    weights: Path = typer.Option(
        None,
        help="Local backbone weights (.safetensors/.pth) [default: $SELFMENT_WEIGHTS, else the "
        "shared DINOv2 ViT-S/14].",
    ),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="Backbone preset."),
    device: str = typer.Option(RunConfig.device, help=f"{DEVICE_HELP}."),
    resolution: list[int] = typer.Option(
        [DEFAULT_RESOLUTION, 768], help="Long-side resolution(s) to measure; repeat the option."
    ),
    batch_size: int = typer.Option(RunConfig.batch_size, min=1, help="Images per backbone batch."),
    workers: int = typer.Option(RunConfig.workers, min=1, help="Decoding threads of the pipeline."),
    precision: list[str] = typer.Option(
        ["fp32", RunConfig.precision],
        help=f"Backbone precision(s) of the end-to-end runs, each compared with the bare fp32 "
        f"backbone; repeat the option: {', '.join(PRECISION_NAMES)}.",
    ),
    limit: int = typer.Option(24, min=1, help="Images per throughput round."),
    rounds: int = typer.Option(2, min=1, help="Interleaved bare/end-to-end rounds (best kept)."),
    ncut: bool = typer.Option(True, help="Check the eigensolver against scipy at 48x48 patches."),
    rss: bool = typer.Option(True, help="Check peak RSS at --rss-counts folder sizes."),
    rss_counts: list[int] = typer.Option([100, 1000], help="Folder sizes of the memory check."),
    rss_resolution: int = typer.Option(
        DEFAULT_RSS_RESOLUTION, help="Resolution of the memory check (lower is cheaper on CPU)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each round."),
) -> None:
    """Time each stage, compare end-to-end labelling with a bare backbone, check targets."""
    setup_logging(verbose)
    for name in precision:
        require_choice(name, PRECISION_NAMES, "--precision")
    if weights is None and not os.environ.get(WEIGHTS_ENV) and WEIGHTS.is_file():
        weights = WEIGHTS
    config = BenchConfig(
        images=images,
        weights=str(weights) if weights else None,
        backbone=backbone,
        device=device,
        resolutions=tuple(resolution),
        batch_size=batch_size,
        workers=workers,
        precisions=tuple(dict.fromkeys(precision)),
        limit=limit,
        rounds=rounds,
        ncut=ncut,
        rss_counts=tuple(rss_counts) if rss else (),
        rss_resolution=rss_resolution,
    )
    with user_errors(BackboneError, FileNotFoundError, NotADirectoryError, RuntimeError):
        report = run_bench(config)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    typer.run(bench)

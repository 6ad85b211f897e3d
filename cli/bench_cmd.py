"""``selfment-label bench``: per-stage speed, end-to-end vs bare backbone, memory, targets."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from selfment_label.backbone import DEFAULT_BACKBONE, BackboneError
from selfment_label.bench import (
    DEFAULT_RSS_RESOLUTION,
    BenchConfig,
    BenchReport,
    run_bench,
)
from selfment_label.run import DEFAULT_RESOLUTION, PRECISIONS

from .console import console, require_choice, setup_logging, user_errors

STAGES = ("decode", "backbone", "ncut", "ipo", "masks", "write")


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
        table = Table(title="throughput (decode runs in worker threads, overlapped)")
        table.add_column("measure")
        for row in report.throughput:
            table.add_column(f"{row.resolution} px", justify="right")
        rows = report.throughput
        table.add_row("images per round", *[str(r.images) for r in rows])
        for stage in STAGES:
            table.add_row(f"{stage} ms/image", *[f"{r.stage_ms.get(stage, 0.0):.1f}" for r in rows])
        table.add_row("end-to-end images/s", *[f"{r.end_to_end_ips:.3f}" for r in rows])
        table.add_row("bare backbone images/s", *[f"{r.bare_ips:.3f}" for r in rows])
        table.add_row("ratio", *[f"{r.ratio:.3f}" for r in rows])
        console.print(table)
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
    images: Path = typer.Argument(..., help="Folder of real images (the first --limit are used)."),
    weights: Path = typer.Option(
        None, help="Local backbone weights (.safetensors/.pth). Env: SELFMENT_WEIGHTS."
    ),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="Backbone preset."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resolution: list[int] = typer.Option(
        [DEFAULT_RESOLUTION, 768], help="Long-side resolution(s) to measure; repeat the option."
    ),
    batch_size: int = typer.Option(4, min=1, help="Images per backbone batch."),
    workers: int = typer.Option(2, min=1, help="Decoding threads of the pipeline."),
    precision: str = typer.Option("fp32", help=f"Backbone precision: {', '.join(PRECISIONS)}."),
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
    require_choice(precision, PRECISIONS, "--precision")
    config = BenchConfig(
        images=images,
        weights=str(weights) if weights else None,
        backbone=backbone,
        device=device,
        resolutions=tuple(resolution),
        batch_size=batch_size,
        workers=workers,
        precision=precision,
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


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command()(bench)

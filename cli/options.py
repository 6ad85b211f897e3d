"""Options that several commands share, each declared once (one default, one help text), and
the helpers that read them.

Every ``*_option()`` returns a fresh ``typer.Option`` (or ``typer.Argument``) for a command's
signature; defaults come from ``selfment_label.config``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from selfment_label.config import (
    DEFAULT_ZOOM,
    DEVICE_HELP,
    PRECISION_HELP,
    PRECISION_NAMES,
    RAY_CPU_THREADS_PER_ACTOR,
    REFINE_METHODS,
    RayConfig,
    RunConfig,
)

from .console import EXIT_USAGE, fail, invalid_options, require_choice, user_errors

if TYPE_CHECKING:
    from selfment_label.engine import Executor

RAY_HELP = "Run on a Ray cluster with Ray Data (needs the ray extra)."
RAY_ADDRESS_HELP = (
    "With --ray: the cluster (auto, ray://host:port, host:port) \\[default: $RAY_ADDRESS, "
    "else a local Ray instance for this run]."
)
RAY_ACTORS_HELP = (
    "With --ray: model replicas \\[default: one per GPU; CPU-only: one per "
    f"{RAY_CPU_THREADS_PER_ACTOR} CPUs]."
)


def images_argument() -> Any:
    """The folder (or object storage prefix) to label: ``run`` and ``apply``."""
    return typer.Argument(
        ...,
        help="Folder of images (searched recursively), or an object storage prefix "
        "(s3://bucket/prefix; needs the ray extra).",
    )


def run_folder_option() -> Any:
    """``--out``/``-o``, the run folder to write: ``run`` and ``apply``."""
    return typer.Option(None, "--out", "-o", help="Run folder \\[default: ./<folder>-selfment].")


def device_option(help: str = f"{DEVICE_HELP}.") -> Any:
    """``--device`` (``help`` says what runs there when it is not the labelling model)."""
    return typer.Option(RunConfig.device, help=help)


def precision_option() -> Any:
    """``--precision``: ``run``, ``apply``, ``train`` and ``review``."""
    return typer.Option(RunConfig.precision, help=f"{PRECISION_HELP}.")


def batch_size_option() -> Any:
    """``--batch-size`` of the backbone: ``run`` and ``apply``."""
    return typer.Option(RunConfig.batch_size, min=1, help="Images per backbone batch.")


def workers_option() -> Any:
    """``--workers``, the decoding threads: ``run`` and ``apply``."""
    return typer.Option(RunConfig.workers, min=1, help="Decoding threads.")


def save_scores_option() -> Any:
    """``--save-scores``: ``run`` and ``apply``."""
    return typer.Option(
        RunConfig.save_scores,
        help="Also save soft score maps (per-pixel foreground probability, for "
        "threshold-sweep eval).",
    )


def refine_option() -> Any:
    """``--refine``: ``run`` and ``apply``."""
    return typer.Option(
        RunConfig.refine,
        help=f"Edge refinement of the masks, guided by the image: {', '.join(REFINE_METHODS)} "
        "(guided filter; dense CRF, needs the crf extra).",
    )


def offline_option() -> Any:
    """``--offline``: every command that may load backbone weights."""
    return typer.Option(False, help="Never download weights from the hub.")


def overwrite_run_option() -> Any:
    """``--overwrite`` of a run folder: ``run`` and ``apply``."""
    return typer.Option(False, help="Replace a run folder made with other options.")


def ray_option() -> Any:
    """``--ray``: ``run`` and ``apply``."""
    return typer.Option(False, "--ray", help=RAY_HELP)


def ray_address_option() -> Any:
    """``--ray-address``: ``run`` and ``apply``."""
    return typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP)


def ray_actors_option() -> Any:
    """``--ray-actors``: ``run`` and ``apply``."""
    return typer.Option(None, "--ray-actors", help=RAY_ACTORS_HELP)


def zoom_option(what: str) -> Any:
    """``--zoom``: ``run`` (instances mode) and ``apply`` (an instance head); ``what`` names
    what labels the views."""
    return typer.Option(
        False,
        "--zoom",
        help=f"Also label four corner crops of each image (--zoom-crop of each side, each at "
        f"the full resolution) with {what} and add their masks that find new objects (five "
        "backbone passes per image).",
    )


def zoom_crop_option() -> Any:
    """``--zoom-crop``, the corner crops' side as a fraction of the image's."""
    return typer.Option(
        DEFAULT_ZOOM, "--zoom-crop", help="With --zoom: each crop's side / the image's side."
    )


def zoom_fraction(context: typer.Context, zoom: bool, zoom_crop: float) -> float | None:
    """The run's ``RunConfig.zoom`` (None without ``--zoom``); ``--zoom-crop`` without
    ``--zoom`` is a usage error."""
    source = context.get_parameter_source("zoom_crop")
    if not zoom and source is not None and source.name == "COMMANDLINE":
        raise fail("--zoom-crop sizes the crops of --zoom: pass --zoom too", EXIT_USAGE)
    return zoom_crop if zoom else None


def verbose_option() -> Any:
    """``--verbose``/``-v``: every command."""
    return typer.Option(False, "--verbose", "-v", help="Log details.")


def labelling_config(
    *,
    weights: Path | None,
    device: str,
    precision: str,
    batch_size: int,
    workers: int,
    save_scores: bool,
    offline: bool,
    refine: str,
    **more: Any,
) -> RunConfig:
    """The ``RunConfig`` of the labelling options ``run`` and ``apply`` share (``more``: the
    options only ``run`` has); an unknown choice or a value out of range is a usage error
    (exit 2)."""
    require_choice(precision, PRECISION_NAMES, "--precision")
    require_choice(refine, REFINE_METHODS, "--refine")
    with invalid_options():
        return RunConfig(
            weights=str(weights) if weights else None,
            device=device,
            precision=precision,
            batch_size=batch_size,
            workers=workers,
            save_scores=save_scores,
            allow_download=not offline,
            refine=refine,
            **more,
        )


def ray_executor(
    ray: bool, address: str | None, actors: int | None, verbose: bool = False
) -> Executor | None:
    """The executor ``--ray``/``--ray-address``/``--ray-actors`` ask for (None: this process).

    Ray's own log lines (start-up notices, Ray Data's execution reports) show only with
    ``verbose``. Exits with one sentence when Ray is not installed or the options do not go
    together.
    """
    if not ray:
        if address or actors:
            raise fail("--ray-address and --ray-actors apply to a Ray run: pass --ray too")
        return None
    with invalid_options():
        options = RayConfig(address=address, actors=actors)
    from selfment_label.distributed.ray_run import RayExecutor

    with user_errors():
        executor = RayExecutor(options)
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    return executor

"""Speed benchmark of the labelling engine: per-stage cost, end-to-end vs bare backbone.

Every figure that is compared is measured in one process, interleaved, so that a loaded
machine slows both sides alike: rounds alternate a bare backbone pass over pre-decoded
images and a real ``label_folder`` run over the same images, and the best round of each
is kept (noise only ever adds time). The memory check runs each folder size in its own
subprocess so that each reports its own peak RSS.

Targets: end-to-end at fp32 >= 0.85 x the bare fp32 backbone (issue 6); end-to-end at a
reduced precision (what ``auto`` picks on a CPU with native bf16) >= 2.0 x the bare fp32
backbone (issue 25); NCut solve at 2304 patches >= 5x
faster than ``scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])`` with |cos| >= 0.999;
peak RSS labelling 1000 images <= 1.2 x labelling 100.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfment_label.config import DEFAULT_BACKBONE, DEFAULT_RESOLUTION, RunConfig
from selfment_label.data.batching import batches_by_grid, stack_pixels
from selfment_label.data.images import DecodedImage, find_images, prepare_image
from selfment_label.device import resolve_precision
from selfment_label.features.backbone import Backbone, build_backbone
from selfment_label.runfolder.label import label_folder
from selfment_label.segment.ncut import affinity, second_eigenvector

logger = logging.getLogger(__name__)

THROUGHPUT_TARGET = 0.85
REDUCED_THROUGHPUT_TARGET = 2.0
NCUT_SPEEDUP_TARGET = 5.0
NCUT_COS_TARGET = 0.999
RSS_GROWTH_TARGET = 1.2
NCUT_GRID = (48, 48)
DEFAULT_RSS_COUNTS = (100, 1000)
DEFAULT_RSS_RESOLUTION = 224


@dataclass
class BenchConfig:
    """Options of a benchmark run.

    Arguments:
      images: folder of real images.
      weights: local backbone weights (else ``$SELFMENT_WEIGHTS``, else the hub).
      backbone: preset name.
      device: ``auto``, ``cpu`` or ``cuda``.
      resolutions: long-side resolutions to measure throughput at.
      batch_size: images per backbone batch.
      workers: decoding threads of the pipeline.
      precisions: backbone precisions of the end-to-end runs (each compared with the bare
        fp32 backbone; ``auto`` is resolved on the device).
      limit: images used for the throughput rounds (the first ones in name order).
      rounds: interleaved bare/end-to-end rounds per resolution (best kept).
      ncut: whether to run the eigensolver check.
      ncut_grid: patch grid of the eigensolver check (48 x 48 = 2304 patches).
      rss_counts: folder sizes of the memory check (empty: skip it).
      rss_resolution: resolution of the memory check (lower keeps it affordable on a CPU).
    """

    images: Path
    weights: str | None = None
    backbone: str = DEFAULT_BACKBONE
    device: str = "auto"
    resolutions: tuple[int, ...] = (DEFAULT_RESOLUTION, 768)
    batch_size: int = 4
    workers: int = 2
    precisions: tuple[str, ...] = ("fp32", "auto")
    limit: int = 24
    rounds: int = 2
    ncut: bool = True
    ncut_grid: tuple[int, int] = NCUT_GRID
    rss_counts: tuple[int, ...] = DEFAULT_RSS_COUNTS
    rss_resolution: int = DEFAULT_RSS_RESOLUTION


@dataclass
class Target:
    """One pass/fail target.

    Arguments:
      name: what is measured.
      measured: the measured ratio.
      bound: the bound it must meet.
      higher_is_better: whether ``measured >= bound`` (else ``<=``) passes.
      detail: how it was measured.
    """

    name: str
    measured: float
    bound: float
    higher_is_better: bool = True
    detail: str = ""

    @property
    def passed(self) -> bool:
        """Whether the target is met."""
        if self.higher_is_better:
            return self.measured >= self.bound
        return self.measured <= self.bound


@dataclass
class PrecisionRun:
    """Throughput of one precision at one resolution.

    Arguments:
      asked: the precision asked for (``auto``, ``fp32``, ...).
      used: what it resolved to on the device.
      bare_ips: best bare backbone images/s in that precision.
      end_to_end_ips: best end-to-end ``label_folder`` images/s.
      stage_ms: ms/image per stage of the best end-to-end round.
      peak_gpu_mib: peak GPU memory allocated by torch during the end-to-end runs (None on
        a CPU).
    """

    asked: str
    used: str
    bare_ips: float
    end_to_end_ips: float
    stage_ms: dict[str, float]
    peak_gpu_mib: float | None = None


@dataclass
class ThroughputResult:
    """Throughput at one resolution.

    Arguments:
      resolution: long side in pixels.
      images: images per round.
      bare_fp32_ips: best bare fp32 backbone images/s (the reference of every ratio).
      runs: the precisions measured, by the name asked for.
    """

    resolution: int
    images: int
    bare_fp32_ips: float
    runs: dict[str, PrecisionRun]

    def ratio(self, precision: str) -> float:
        """End-to-end images/s at ``precision`` over the bare fp32 backbone's."""
        run = self.runs[precision]
        return run.end_to_end_ips / self.bare_fp32_ips if self.bare_fp32_ips else 0.0


@dataclass
class BenchReport:
    """Everything a benchmark run measured."""

    machine: dict[str, Any]
    throughput: list[ThroughputResult] = field(default_factory=list)
    ncut: dict[str, float] | None = None
    rss: dict[str, Any] | None = None
    targets: list[Target] = field(default_factory=list)
    peak_rss_mb: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "machine": self.machine,
            "throughput": [
                {
                    "resolution": t.resolution,
                    "images": t.images,
                    "bare_fp32_ips": t.bare_fp32_ips,
                    "runs": {
                        name: {**vars(run), "ratio_to_bare_fp32": round(t.ratio(name), 4)}
                        for name, run in t.runs.items()
                    },
                }
                for t in self.throughput
            ],
            "ncut": self.ncut,
            "rss": self.rss,
            "targets": [{**vars(t), "passed": t.passed} for t in self.targets],
            "peak_rss_mb": self.peak_rss_mb,
        }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(device: torch.device) -> dict[str, Any]:
    """Cores, torch threads and device name: what the figures were measured on.

    Arguments:
      device: the device the backbone runs on.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "device_name": name,
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def link_images(source: Path, names: list[str], folder: Path, numbered: bool = False) -> None:
    """Fill ``folder`` with symlinks to ``names`` (relative to ``source``).

    Arguments:
      source: the real image folder.
      names: relative image paths; may repeat when ``numbered``.
      folder: an existing, empty folder.
      numbered: prefix each link with its index, so repeated images get distinct names.
    """
    for i, name in enumerate(names):
        link = folder / (f"{i:06d}_{Path(name).name}" if numbered else name)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((source / name).resolve())


def decode_all(
    root: Path, names: list[str], resolution: int, backbone: Backbone
) -> list[DecodedImage]:
    """Decode and resize ``names`` under ``root`` for ``backbone`` at ``resolution``."""
    mean, std = backbone.mean_std
    return [prepare_image(root, n, resolution, backbone.patch_size, mean, std) for n in names]


def bare_backbone_seconds(
    backbone: Backbone, decoded: list[DecodedImage], batch_size: int, precision: str = "fp32"
) -> float:
    """Seconds of backbone forwards alone over pre-decoded images, batched by grid.

    The batches are the ones the pipeline forms (same grouping, same batch size); the
    time includes the host-to-device copy and ends with a device sync.

    Arguments:
      backbone: the model.
      decoded: images already decoded and resized.
      batch_size: images per batch.
      precision: backbone precision (``auto`` resolved on the backbone's device).
    """
    dtype = resolve_precision(precision, backbone.device).dtype
    stream = ((d.file_name, d) for d in decoded)
    batches = [b for b, _ in batches_by_grid(stream, batch_size, window=2 * batch_size) if b]
    start = time.perf_counter()
    for batch in batches:
        backbone.patch_tokens(stack_pixels(batch, backbone.device), dtype)
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_throughput(
    config: BenchConfig, backbone: Backbone, resolution: int, work_dir: Path
) -> ThroughputResult:
    """Interleaved rounds of the bare backbone and real ``label_folder`` runs at one resolution.

    Each round times the bare fp32 backbone, then, for every precision of ``config``, the
    bare backbone in it and a ``label_folder`` run in it; the best round of each is kept.

    Arguments:
      config: benchmark options.
      backbone: the model (shared by all sides).
      resolution: long side in pixels.
      work_dir: scratch folder for the image subset and run folders.
    """
    names = find_images(config.images)[: config.limit]
    if not names:
        raise FileNotFoundError(f"no images under {config.images}")
    subset = work_dir / f"images-{resolution}"
    subset.mkdir()
    link_images(config.images, names, subset)
    decoded = decode_all(config.images, names, resolution, backbone)
    sides = dict.fromkeys(("fp32", *config.precisions))
    for precision in sides:
        bare_backbone_seconds(backbone, decoded[: config.batch_size], config.batch_size, precision)
    bare = dict.fromkeys(sides, float("inf"))
    e2e = dict.fromkeys(config.precisions, float("inf"))
    stages: dict[str, dict[str, float]] = {}
    peaks: dict[str, float] = {}
    cuda = backbone.device.type == "cuda"
    for round_index in range(config.rounds):
        for precision in sides:
            seconds = bare_backbone_seconds(backbone, decoded, config.batch_size, precision)
            bare[precision] = min(bare[precision], seconds)
            if precision not in e2e:
                continue
            run_config = RunConfig(
                backbone=config.backbone,
                resolution=resolution,
                device=str(backbone.device),
                precision=precision,
                batch_size=config.batch_size,
                workers=config.workers,
            )
            if cuda:
                torch.cuda.reset_peak_memory_stats(backbone.device)
            start = time.perf_counter()
            summary = label_folder(
                subset,
                work_dir / f"run-{resolution}-{precision}",
                run_config,
                overwrite=True,
                backbone=backbone,
            )
            seconds = time.perf_counter() - start
            if cuda:
                peak = torch.cuda.max_memory_allocated(backbone.device) / 2**20
                peaks[precision] = max(peaks.get(precision, 0.0), peak)
            logger.info(
                "%d px %s round %d: bare %.2f s, end-to-end %.2f s",
                resolution,
                precision,
                round_index,
                bare[precision],
                seconds,
            )
            if seconds < e2e[precision]:
                e2e[precision] = seconds
                stages[precision] = {
                    k: 1000 * v / max(summary.labelled, 1) for k, v in summary.stages.items()
                }
    runs = {
        precision: PrecisionRun(
            asked=precision,
            used=resolve_precision(precision, backbone.device).name,
            bare_ips=len(names) / bare[precision],
            end_to_end_ips=len(names) / e2e[precision],
            stage_ms=stages[precision],
            peak_gpu_mib=peaks.get(precision),
        )
        for precision in config.precisions
    }
    return ThroughputResult(resolution, len(names), len(names) / bare["fp32"], runs)


def ncut_speedup(
    backbone: Backbone, image_root: Path, grid: tuple[int, int] = NCUT_GRID, repeats: int = 3
) -> dict[str, float]:
    """Our eigensolver vs ``scipy.linalg.eigh`` on one real affinity of ``grid`` patches.

    The tokens come from the first image of ``image_root`` resized to exactly ``grid``
    patches. Both solvers are timed on the same float32 affinity (scipy in float64, as it
    would be used); the best of ``repeats`` is kept for each.

    Arguments:
      backbone: the model that makes the tokens.
      image_root: folder of images.
      grid: ``(rows, cols)`` patch grid (48 x 48 = 2304 patches).
      repeats: timings per solver.

    Returns:
      ``{"patches", "ours_ms", "scipy_ms", "speedup", "cos", "iterations"}``.
    """
    import scipy.linalg
    from PIL import Image

    from selfment_label.data.images import load_image

    name = find_images(image_root)[0]
    image, _ = load_image(image_root / name)
    p = backbone.patch_size
    rows, cols = grid
    resized = image.resize((cols * p, rows * p), Image.Resampling.BICUBIC)
    mean, std = backbone.mean_std
    array = (np.asarray(resized, dtype=np.float32) / 255.0 - mean) / std
    pixels = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))
    tokens = backbone.patch_tokens(pixels[None].to(backbone.device))
    adjacency = affinity(tokens.reshape(1, rows * cols, -1))

    ours_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = second_eigenvector(adjacency)
        if adjacency.device.type == "cuda":
            torch.cuda.synchronize()
        ours_s = min(ours_s, time.perf_counter() - start)
    a = adjacency[0].double().cpu().numpy()
    d = np.diag(a.sum(1))
    scipy_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _, vectors = scipy.linalg.eigh(d - a, d, subset_by_index=[1, 2])
        scipy_s = min(scipy_s, time.perf_counter() - start)
    ref = vectors[:, 0]
    ours = result.vectors[0].double().cpu().numpy()
    cos = float(abs(ours @ ref) / np.linalg.norm(ours) / np.linalg.norm(ref))
    return {
        "patches": rows * cols,
        "ours_ms": 1000 * ours_s,
        "scipy_ms": 1000 * scipy_s,
        "speedup": scipy_s / ours_s,
        "cos": cos,
        "iterations": int(result.iterations.max()),
    }


def run_child_label(folder: Path, out_dir: Path, config: RunConfig) -> dict[str, float]:
    """Label ``folder`` in this process and report its peak RSS (the subprocess side).

    Arguments:
      folder: the image folder.
      out_dir: the run folder.
      config: run options.
    """
    summary = label_folder(folder, out_dir, config, overwrite=True)
    return {
        "images": summary.labelled,
        "seconds": summary.seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_of_run(
    source: Path, names: list[str], count: int, config: RunConfig, work_dir: Path
) -> dict[str, float]:
    """Peak RSS of labelling ``count`` images (``names`` repeated) in a fresh subprocess.

    Arguments:
      source: folder holding ``names``.
      names: images to repeat via symlinks.
      count: folder size.
      config: run options (the weights must be loadable in the child).
      work_dir: scratch folder.
    """
    folder = work_dir / f"rss-{count}"
    folder.mkdir()
    link_images(source, [names[i % len(names)] for i in range(count)], folder, numbered=True)
    payload = json.dumps(
        {
            "folder": str(folder),
            "out": str(work_dir / f"rss-run-{count}"),
            "config": config.shared_options(),
        }
    )
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), payload],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory-check child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_rss(config: BenchConfig, work_dir: Path) -> dict[str, Any]:
    """Peak RSS for each folder size of ``config.rss_counts``, each in its own process."""
    names = find_images(config.images)
    run_config = RunConfig(
        backbone=config.backbone,
        weights=config.weights,
        resolution=config.rss_resolution,
        device=config.device,
        precision=config.precisions[-1],
        batch_size=config.batch_size,
        workers=config.workers,
        allow_download=False,
    )
    runs = {
        str(count): peak_rss_of_run(config.images, names, count, run_config, work_dir)
        for count in config.rss_counts
    }
    return {"resolution": config.rss_resolution, "runs": runs}


def throughput_targets(result: ThroughputResult, rounds: int) -> list[Target]:
    """End-to-end over bare fp32 backbone, per precision: >= 0.85 at fp32, >= 2.0 reduced."""
    return [
        Target(
            f"end-to-end {name} ({run.used}) / bare fp32 backbone at {result.resolution} px",
            result.ratio(name),
            THROUGHPUT_TARGET if run.used == "fp32" else REDUCED_THROUGHPUT_TARGET,
            detail=f"{result.images} images, best of {rounds} interleaved rounds",
        )
        for name, run in result.runs.items()
    ]


def run_bench(config: BenchConfig, backbone: Backbone | None = None) -> BenchReport:
    """Run every measurement of ``config`` and evaluate the targets.

    Arguments:
      config: benchmark options.
      backbone: a ready model (built from ``config`` when None).
    """
    from selfment_label.device import resolve_device

    device = resolve_device(config.device)
    if backbone is None:
        backbone = build_backbone(config.backbone, config.weights, device, allow_download=False)
    report = BenchReport(machine=machine_facts(backbone.device))
    with tempfile.TemporaryDirectory(prefix="selfment-bench-") as scratch:
        work_dir = Path(scratch)
        for resolution in config.resolutions:
            result = measure_throughput(config, backbone, resolution, work_dir)
            report.throughput.append(result)
            report.targets.extend(throughput_targets(result, config.rounds))
        if config.ncut:
            report.ncut = ncut_speedup(backbone, config.images, config.ncut_grid)
            report.targets.append(
                Target(
                    f"NCut speedup vs scipy eigh at {report.ncut['patches']} patches",
                    report.ncut["speedup"],
                    NCUT_SPEEDUP_TARGET,
                    detail=f"|cos| = {report.ncut['cos']:.5f}",
                )
            )
            report.targets.append(
                Target("NCut eigenvector |cos| vs scipy", report.ncut["cos"], NCUT_COS_TARGET)
            )
        if len(config.rss_counts) >= 2:
            report.rss = measure_rss(config, work_dir)
            runs = report.rss["runs"]
            small, large = min(config.rss_counts), max(config.rss_counts)
            report.targets.append(
                Target(
                    f"peak RSS {large} images / {small} images",
                    runs[str(large)]["peak_rss_mb"] / runs[str(small)]["peak_rss_mb"],
                    RSS_GROWTH_TARGET,
                    higher_is_better=False,
                    detail=f"subprocess per size, {config.rss_resolution} px",
                )
            )
    report.peak_rss_mb = peak_rss_mb()
    return report


def _child_main(payload: str) -> None:
    spec = json.loads(payload)
    config = RunConfig(**spec["config"])
    print(json.dumps(run_child_label(Path(spec["folder"]), Path(spec["out"]), config)))


if __name__ == "__main__":
    _child_main(sys.argv[1])

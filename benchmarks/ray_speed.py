"""Local run against ``--ray`` with 1 and 2 actors on the same images, Ray's overhead per image,
and a per-GPU cost model from the measured stage times and the backbone's FLOPs.

Every run labels the same ``--images`` ecssd-dev images with the real DINOv2 ViT-S/14 into
its own run folder (the masks of every Ray run are checked equal to the local run's). One
local Ray instance with ``--cpus`` CPUs serves the Ray runs; its start is timed apart. For each
run the progress callback's timestamps split the labelling time into start-up (until the
first image is journalled: for Ray, actors starting and receiving the model) and the steady
rate after it. Wall-clock rates depend on what else the machine runs, so the CPU seconds of
the whole process tree (this process, and Ray's services, tasks and actors) are sampled too:
Ray's overhead per image is the Ray run's CPU seconds per image minus the local run's, in
wall-clock terms the steady seconds per image minus the local run's.

    .venv/bin/python -m benchmarks.ray_speed --images 100            # --json FILE

The cost model is a model, not a measurement: no GPU was available. See ``gpu_model``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from PIL import Image

if not __package__:  # run as `python benchmarks/X.py`: import the checkout's benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_asset_arguments, load_backbone
from benchmarks.speed import link_images
from selfment_label.config import DEFAULT_RESOLUTION, RayConfig, RunConfig
from selfment_label.data.images import find_images, grid_for
from selfment_label.distributed.ray_run import RayExecutor
from selfment_label.engine import Executor
from selfment_label.runfolder.label import label_folder

# Dense bf16/fp16 tensor throughput (TFLOP/s, vendor peak, no sparsity) of common GPUs.
GPU_PEAK_TFLOPS = {"T4": 65.0, "A10G": 125.0, "L4": 121.0, "A100": 312.0, "H100 SXM": 989.0}
ASSUMED_UTILISATION = 0.3
"""Fraction of peak a small ViT (dim 384) reaches at batch 4-16: an assumption."""
GPU_SEGMENT_SECONDS = 0.002
"""NCut + IPO per image on a GPU, batched: assumed launch-bound (~100 small kernels per batch)."""


class TreeCpu:
    """CPU seconds (user + system) of this process and all its descendants over a block, sampled
    every ``period`` seconds in a thread (a process that ends loses at most one period)."""

    def __init__(self, period: float = 0.25):
        self.period = period
        self._start: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> dict[tuple[int, float], float]:
        root = psutil.Process()
        seen = {}
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
                seen[(process.pid, process.create_time())] = times.user + times.system
            except psutil.Error:
                continue
        return seen

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self._last.update(self._sample())

    def __enter__(self) -> TreeCpu:
        self._start = self._sample()
        self._last = dict(self._start)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(self._sample())

    @property
    def seconds(self) -> float:
        """CPU seconds spent in the block."""
        return sum(cpu - self._start.get(key, 0.0) for key, cpu in self._last.items())


@dataclass
class Timing:
    """One run's figures.

    Arguments:
      name: which run.
      seconds: the labelling loop (label_folder's ``seconds``).
      first: seconds from the loop's start to the first journalled image.
      steady: seconds per image after the first one.
      stages: seconds per stage, summed over images (and actors).
      cpu: CPU seconds of the process tree during the run.
    """

    name: str
    seconds: float
    first: float
    steady: float
    stages: dict[str, float]
    cpu: float


def timed_run(
    name: str, images: Path, out: Path, config: RunConfig, backbone: Any, executor: Executor | None
) -> Timing:
    """Label ``images`` into ``out`` and time it from the progress callback."""
    stamps: list[float] = []
    start = time.perf_counter()
    with TreeCpu() as cpu:
        summary = label_folder(
            images,
            out,
            config,
            backbone=backbone,
            executor=executor,
            progress=lambda *_: stamps.append(time.perf_counter()),
        )
    first = stamps[0] - start
    steady = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return Timing(name, summary.seconds, first, steady, summary.stages, cpu.seconds)


def backbone_gflops(grids: list[tuple[int, int]], dim: int = 384, depth: int = 12) -> float:
    """Mean forward GFLOPs per image of a ViT (2 FLOPs per multiply-add): the four attention
    projections and the 4x MLP (24 N D^2) plus the attention products (4 N^2 D), per block."""
    total = 0.0
    for rows, cols in grids:
        tokens = rows * cols + 1
        total += depth * (24 * tokens * dim * dim + 4 * tokens * tokens * dim)
    return total / len(grids) / 1e9


def gpu_model(timings: list[Timing], count: int, gflops: float) -> list[dict[str, Any]]:
    """Images/s per GPU: one actor handles an image serially (backbone on the GPU at the
    assumed utilisation, NCut + IPO on the GPU, then full-size masks + RLE on its CPU thread
    at the measured CPU cost, the least of the runs: other load only inflates it); decoding
    runs in other CPU tasks and is not on this path."""
    masks = min(t.stages.get("masks", 0.0) + t.stages.get("write", 0.0) for t in timings) / count
    decode = min(t.stages.get("decode", 0.0) for t in timings) / count
    rows = []
    for gpu, tflops in GPU_PEAK_TFLOPS.items():
        backbone = gflops / (tflops * 1e3 * ASSUMED_UTILISATION)
        actor = backbone + GPU_SEGMENT_SECONDS + masks
        rows.append(
            {
                "gpu": gpu,
                "backbone_ms": round(1e3 * backbone, 3),
                "actor_ms_per_image": round(1e3 * actor, 2),
                "images_per_s_one_actor": round(1 / actor, 1),
                "gpu_bound_images_per_s": round(1 / (backbone + GPU_SEGMENT_SECONDS), 1),
                "decode_cpus_needed_at_gpu_bound": round(
                    decode / (backbone + GPU_SEGMENT_SECONDS), 1
                ),
            }
        )
    return rows


def main() -> None:
    """Parse options, measure, print the table (and a JSON file with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_asset_arguments(parser)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import ray

    backbone = load_backbone(args.weights)
    source = args.data / "images"
    names = find_images(source)[: args.images]
    config = RunConfig(resolution=args.resolution, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="selfment-ray-speed-") as scratch:
        work = Path(scratch)
        images = work / "images"
        images.mkdir()
        link_images(source, names, images)
        timings = [timed_run("local", images, work / "local", config, backbone, None)]
        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - start
        try:
            for actors in args.actors:
                out = work / f"ray-{actors}"
                executor = RayExecutor(RayConfig(actors=actors))
                name = f"ray, {actors} actor(s)"
                timings.append(timed_run(name, images, out, config, backbone, executor))
                if _masks(out) != _masks(work / "local"):
                    raise SystemExit(f"{name}: masks differ from the local run's")
        finally:
            ray.shutdown()
    grids = []
    for name in names:
        with Image.open(source / name) as image:
            grids.append(grid_for(*image.size, args.resolution, backbone.patch_size))
    report = _report(timings, len(names), ray_start, backbone_gflops(grids))
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def _masks(run: Path) -> tuple[Any, Any]:
    coco = json.loads((run / "annotations.json").read_text())
    return coco["images"], coco["annotations"]


def _report(timings: list[Timing], count: int, ray_start: float, gflops: float) -> dict[str, Any]:
    local = timings[0]
    runs = []
    for timing in timings:
        runs.append(
            {
                "run": timing.name,
                "seconds": round(timing.seconds, 2),
                "images_per_s": round(count / timing.seconds, 3),
                "startup_s": round(timing.first, 2),
                "steady_images_per_s": round(1 / timing.steady, 3),
                "overhead_ms_per_image": round(1e3 * (timing.steady - local.steady), 1),
                "cpu_s_per_image": round(timing.cpu / count, 3),
                "overhead_cpu_ms_per_image": round(1e3 * (timing.cpu - local.cpu) / count, 1),
                "stage_ms_per_image": {
                    k: round(1e3 * v / count, 1) for k, v in timing.stages.items()
                },
            }
        )
    return {
        "images": count,
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "cpus": os.cpu_count(),
        "ray_init_s": round(ray_start, 2),
        "runs": runs,
        "backbone_gflops_per_image": round(gflops, 1),
        "assumed_gpu_utilisation": ASSUMED_UTILISATION,
        "assumed_gpu_segment_ms": 1e3 * GPU_SEGMENT_SECONDS,
        "gpu_model": gpu_model(timings, count, gflops),
    }


def _print(report: dict[str, Any]) -> None:
    print(
        f"{report['images']} images, {report['cpus']} CPUs, load average "
        f"{report['load_average_1_5_15']} at the end; ray.init of the local instance "
        f"{report['ray_init_s']} s"
    )
    print(
        f"{'run':<18} {'s':>7} {'img/s':>7} {'start s':>8} {'steady img/s':>13} "
        f"{'overhead ms/img':>16} {'CPU s/img':>10} {'overhead CPU ms/img':>20}"
    )
    for run in report["runs"]:
        print(
            f"{run['run']:<18} {run['seconds']:>7} {run['images_per_s']:>7} "
            f"{run['startup_s']:>8} {run['steady_images_per_s']:>13} "
            f"{run['overhead_ms_per_image']:>16} {run['cpu_s_per_image']:>10} "
            f"{run['overhead_cpu_ms_per_image']:>20}"
        )
        print(f"    stages ms/image: {run['stage_ms_per_image']}")
    print(
        f"cost model (not a measurement): {report['backbone_gflops_per_image']} GFLOP/image, "
        f"{report['assumed_gpu_utilisation']:.0%} of peak, NCut+IPO "
        f"{report['assumed_gpu_segment_ms']} ms/image on the GPU"
    )
    for row in report["gpu_model"]:
        print(f"    {row}")


if __name__ == "__main__":
    main()

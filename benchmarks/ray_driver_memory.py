"""Driver memory and pipeline rate of ``--ray`` with a model that costs almost nothing.

Labels ``--sizes`` folders of synthetic 96x72 images with the tests' tiny random ViT (112 px,
one actor, a local Ray instance of ``--cpus`` CPUs), each size in its own subprocess, and
prints the driver's peak RSS (model and Ray client included) and the seconds of the Ray run
and of a local run of the same folder; the masks of both are checked equal.

    .venv/bin/python -m benchmarks.ray_driver_memory              # --sizes 100 1000 --cpus 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

if not __package__:  # run as `python benchmarks/X.py`: import the checkout's benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for index in range(count):
        pixels = rng.integers(0, 60, (72, 96, 3), dtype=np.uint8)
        pixels[20:55, 30:70] = rng.integers(150, 255, 3, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.png")


def measure(count: int, cpus: int, work: Path) -> dict[str, float]:
    """One size, in this process: Ray run (peak RSS after it), then a local run."""
    import ray

    from benchmarks._common import TINY_RESOLUTION, tiny_backbone
    from selfment_label.config import RayConfig, RunConfig
    from selfment_label.distributed.ray_run import RayExecutor
    from selfment_label.runfolder.label import label_folder

    images = work / "images"
    _images(images, count)
    backbone = tiny_backbone()
    config = RunConfig(resolution=TINY_RESOLUTION, batch_size=8)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        executor = RayExecutor(RayConfig(actors=1))
        label_folder(images, work / "ray", config, backbone=backbone, executor=executor)
        ray_seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        ray.shutdown()
    start = time.perf_counter()
    label_folder(images, work / "local", config, backbone=backbone)
    local_seconds = time.perf_counter() - start
    masks = [json.loads((work / run / "annotations.json").read_text()) for run in ("ray", "local")]
    same = all(masks[0][key] == masks[1][key] for key in ("images", "annotations"))
    return {
        "images": count,
        "driver_peak_rss_mib": round(peak, 1),
        "ray_seconds": round(ray_seconds, 1),
        "local_seconds": round(local_seconds, 1),
        "same_masks": same,
    }


def main() -> None:
    """Run every size in a subprocess and print one JSON line per size, then the RSS ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory(prefix="selfment-ray-rss-") as scratch:
            print(json.dumps(measure(args.one, args.cpus, Path(scratch))))
        return
    results = []
    for size in args.sizes:
        command = [sys.executable, str(Path(__file__).resolve()), "--one", str(size)]
        output = subprocess.run(
            [*command, "--cpus", str(args.cpus)], capture_output=True, text=True, check=True
        ).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    ratio = results[-1]["driver_peak_rss_mib"] / results[0]["driver_peak_rss_mib"]
    print(f"driver peak RSS, {results[-1]['images']} vs {results[0]['images']} images: {ratio:.3f}")


if __name__ == "__main__":
    main()

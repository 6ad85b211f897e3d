"""What the tests share: a small run config, image folders (synthetic or copied from ecssd-dev),
one labelling call, FiftyOne clean-up, and the checks of a run resumed after a kill."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from benchmarks._common import TINY_RESOLUTION
from selfment_label import label_folder
from selfment_label.config import RunConfig, mode_config
from selfment_label.features.backbone import Backbone

SCENE_SIZE = (96, 72)


def tiny_config(**options: Any) -> RunConfig:
    """A run config at ``TINY_RESOLUTION``, with any other option as given."""
    return RunConfig(resolution=TINY_RESOLUTION, **options)


def label_tiny(images: Path, out: Path, backbone: Backbone, mode: str = "instances") -> None:
    """Label ``images`` into ``out`` in ``mode``, at ``TINY_RESOLUTION``."""
    label_folder(images, out, tiny_config(segment=mode_config(mode)), backbone=backbone)


def scene(seed: int, size: tuple[int, int] = SCENE_SIZE) -> Image.Image:
    """A dark noisy ``size`` (width, height) image with one bright 40 x 35 block, placed and
    coloured by ``seed``."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
    y, x = rng.integers(5, 25, 2)
    array[y : y + 35, x : x + 40] = rng.integers(150, 255, 3, dtype=np.uint8)
    return Image.fromarray(array)


def write_scenes(
    folder: Path,
    count: int,
    start: int = 0,
    size: tuple[int, int] | None = SCENE_SIZE,
    name: str = "img{}.png",
    subfolders: bool = False,
) -> Path:
    """Write scenes ``start`` to ``start + count - 1`` into ``folder`` as ``name.format(i)``.

    Arguments:
      size: (width, height) of every image; None gives each its own size.
      subfolders: put every odd-numbered image in ``folder/sub``.
    """
    for i in range(start, start + count):
        sub = folder / ("sub" if subfolders and i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        scene(i, size or (120 - 5 * i, 90 + 7 * i)).save(sub / name.format(i))
    return folder


def write_noise(
    folder: Path, count: int, size: tuple[int, int] = (70, 50), seed: int = 0, name: str = "{}.png"
) -> Path:
    """Write ``count`` images of uniform RGB noise, ``size`` (width, height), named
    ``name.format(i)``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name.format(i))
    return folder


def copy_ecssd(
    ecssd_dir: Path, folder: Path, stems: Iterable[str], subfolders: bool = False
) -> Path:
    """Copy the ecssd-dev images ``stems`` into ``folder`` (every odd one into ``folder/sub``
    with ``subfolders``)."""
    for i, stem in enumerate(stems):
        sub = folder / ("sub" if subfolders and i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(ecssd_dir / "images" / f"{stem}.jpg", sub / f"{stem}.jpg")
    return folder


def ecssd_stems(count: int) -> list[str]:
    """The first ``count`` ecssd-dev stems (0001, 0002, ...)."""
    return [f"{i:04d}" for i in range(1, count + 1)]


def datasets_deleted_after_module(suffix: str) -> Callable[[], Iterator[None]]:
    """An autouse module fixture deleting, at the module's end, every FiftyOne dataset whose
    name holds ``suffix``: assign it to a module-level name in the test module."""

    @pytest.fixture(scope="module", autouse=True)
    def _delete_datasets() -> Iterator[None]:
        yield
        import fiftyone as fo

        for name in fo.list_datasets():
            if suffix in name:
                fo.delete_dataset(name)

    return _delete_datasets


def journal_lines(out: Path) -> int:
    """Lines in the run folder's journal (a header, then one per finished image)."""
    journal = out / "journal.jsonl"
    return journal.read_bytes().count(b"\n") if journal.exists() else 0


def wait_for_journal(out: Path, lines: int, seconds: float, process: subprocess.Popen) -> None:
    """Wait until the journal has ``lines`` lines, ``process`` ends, or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and journal_lines(out) < lines and process.poll() is None:
        time.sleep(0.05)


def assert_killed_mid_run(out: Path, at_least: int, total: int) -> int:
    """The killed run finished between ``at_least`` and ``total`` images and wrote no COCO
    file; returns how many it finished."""
    done_before = journal_lines(out) - 1
    assert at_least <= done_before < total, "the kill must land in the middle of the run"
    assert not (out / "annotations.json").exists()
    return done_before


def assert_resumed_only_the_missing(out: Path, done_before: int, total: int) -> COCO:
    """The resumed run kept what the killed one finished, labelled only the rest, and lists
    each of the ``total`` images once; returns its COCO file."""
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from_journal"] >= done_before
    assert run["resumed_from_journal"] + run["labelled_this_invocation"] == total
    coco = COCO(str(out / "annotations.json"))
    names = [image["file_name"] for image in coco.dataset["images"]]
    assert sorted(names) == sorted(set(names)) and len(names) == total
    return coco

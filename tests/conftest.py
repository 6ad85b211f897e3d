"""Shared fixtures: the real offline assets in ../shared (skipped when absent) and a tiny ViT."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from benchmarks import _common
from benchmarks._common import COCO, ECSSD, WEIGHTS
from selfment_label.features.backbone import Backbone, build_backbone

# FiftyOne: a private database folder per test session and no usage tracking, set before any
# test imports fiftyone (subprocesses inherit them).
FIFTYONE_DB_DIR = tempfile.mkdtemp(prefix="selfment-test-fiftyone-db-")
os.environ["FIFTYONE_DATABASE_DIR"] = FIFTYONE_DB_DIR
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the FiftyOne database a test started, then delete its folder."""
    database = sys.modules.get("fiftyone.core.odm.database")
    service = getattr(database, "_db_service", None)
    if service is not None:
        import psutil

        # FiftyOne attaches to a database service already running on the machine; only one
        # this session started is ours to stop.
        child = None if service.attached else service.child
        service.stop()
        if child is not None:
            processes = [child, *child.children(recursive=True)]
            _, alive = psutil.wait_procs(processes, timeout=10)
            for process in alive:
                process.terminate()
            psutil.wait_procs(alive, timeout=10)
    shutil.rmtree(FIFTYONE_DB_DIR, ignore_errors=True)


def _process_settings() -> dict[str, object]:
    """The process-wide settings a library or a consumer may change behind the suite's back."""
    return {
        "torch threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
    }


@pytest.fixture(autouse=True)
def _process_settings_unchanged():
    """Fail the test that leaves torch's threads (or the OpenMP variable, or torch's
    deterministic mode) changed: later tests would silently run under another setting. A test
    that calls a consumer which changes them (Ultralytics does) must restore them itself."""
    before = _process_settings()
    yield
    after = _process_settings()
    changed = {name: (before[name], after[name]) for name in before if before[name] != after[name]}
    assert not changed, f"the test left process-wide settings changed (before, after): {changed}"


@pytest.fixture(scope="session")
def weights_path() -> Path:
    """The shared DINOv2 ViT-S/14 weights."""
    if not WEIGHTS.is_file():
        pytest.skip(f"shared backbone weights not found at {WEIGHTS}")
    return WEIGHTS


@pytest.fixture(scope="session")
def ecssd_dir() -> Path:
    """The 200-image ECSSD dev set (images/ and masks/)."""
    if not (ECSSD / "images").is_dir():
        pytest.skip(f"ECSSD dev images not found at {ECSSD}")
    return ECSSD


@pytest.fixture(scope="session")
def coco_dir() -> Path:
    """The 32 coco-dev images (images/ and the class-agnostic instances.json)."""
    if not (COCO / "images").is_dir():
        pytest.skip(f"coco-dev images not found at {COCO}")
    return COCO


@pytest.fixture(scope="session")
def coco_multi_object() -> tuple[str, ...]:
    """Four coco-dev images that hold several objects each."""
    return ("000000000009.jpg", "000000000025.jpg", "000000000030.jpg", "000000000034.jpg")


@pytest.fixture(scope="session")
def coco_images(
    tmp_path_factory: pytest.TempPathFactory, coco_dir: Path, coco_multi_object: tuple[str, ...]
) -> Path:
    """A folder of the ``coco_multi_object`` images (tests read it, never write to it)."""
    folder = tmp_path_factory.mktemp("coco") / "images"
    folder.mkdir()
    for name in coco_multi_object:
        shutil.copy(coco_dir / "images" / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def real_backbone(weights_path: Path) -> Backbone:
    """The real DINOv2 ViT-S/14 on the CPU, built once per session."""
    return build_backbone("dinov2-vits14", weights=weights_path, device="cpu")


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    """A randomly initialised two-block ViT with patch 14 (plumbing tests only)."""
    return _common.tiny_backbone()

"""The same image gets the same masks whatever torch's thread count (1-, 2- or many-core
machines, or a caller such as Ultralytics that changes it): every mode, on real images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import copy_ecssd

from selfment_label.config import RunConfig, mode_config
from selfment_label.features.backbone import Backbone
from selfment_label.runfolder.label import label_folder

pytestmark = pytest.mark.slow

THREADS = (1, 2, 4)
ECSSD_STEMS = ("0003", "0042")
COCO_NAMES = ("000000000009.jpg", "000000000025.jpg")  # several objects each


@pytest.fixture(scope="module")
def mixed_folder(ecssd_dir: Path, coco_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two single-object ECSSD images and two many-object COCO images."""
    folder = tmp_path_factory.mktemp("mixed")
    copy_ecssd(ecssd_dir, folder, ECSSD_STEMS)
    for name in COCO_NAMES:
        shutil.copy(coco_dir / "images" / name, folder)
    return folder


def _masks_at(threads: int, folder: Path, out: Path, config: RunConfig, backbone: Backbone):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        label_folder(folder, out, config, backbone=backbone)
    finally:
        torch.set_num_threads(before)
    coco = json.loads((out / "annotations.json").read_text())
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    return sorted(
        (names[a["image_id"]], a["segmentation"]["counts"], a["score"]) for a in coco["annotations"]
    )


@pytest.mark.parametrize("mode", ["single", "instances", "entities"])
def test_masks_do_not_depend_on_torch_threads(
    mode: str, mixed_folder: Path, real_backbone: Backbone, weights_path: Path, tmp_path: Path
) -> None:
    config = RunConfig(weights=str(weights_path), device="cpu", segment=mode_config(mode))
    results = {
        threads: _masks_at(threads, mixed_folder, tmp_path / f"t{threads}", config, real_backbone)
        for threads in THREADS
    }
    assert len(results[1]) >= len(ECSSD_STEMS) + len(COCO_NAMES) - 1
    for threads in THREADS[1:]:
        assert results[threads] == results[1], f"{mode}: {threads} threads differ from 1"

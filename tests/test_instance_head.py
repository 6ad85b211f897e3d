"""The instance head: matching, selection, self-correction rules, and on real coco-dev images
(the real backbone) training, apply, scores, disjointness, resume, CLI, review views. One test
touches FiftyOne: run this module under the shared lock (``flock /work/wt/fiftyone.lock``)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from selfment_label_cli.main import app
from typer.testing import CliRunner

from selfment_label.config import (
    EntitiesConfig,
    InstanceApplyConfig,
    InstancesConfig,
    InstanceTrainConfig,
    RunConfig,
)
from selfment_label.features.backbone import Backbone
from selfment_label.head.apply import apply_head
from selfment_label.head.checkpoint import HeadError, load_checkpoint
from selfment_label.head.instance_model import (
    InstanceHead,
    Prediction,
    hungarian_match,
    select_instances,
    select_parts,
)
from selfment_label.head.instance_train import (
    InstanceImage,
    distil_instances,
    level_masks,
    mirrored,
    train_rounds,
)
from selfment_label.head.rounds import correct_image
from selfment_label.masks import annotation_record
from selfment_label.runfolder.coco import decode_rle, write_coco_stream
from selfment_label.runfolder.label import label_folder
from selfment_label.runfolder.layout import read_run

SMALL = InstanceTrainConfig(epochs=25, batch_size=2, seed=1)


def _box(grid: tuple[int, int], rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(grid)
    mask[rows, cols] = 1.0
    return mask


def test_hungarian_match_pairs_each_query_with_its_own_target() -> None:
    grid = (6, 6)
    a, b = _box(grid, slice(0, 3), slice(0, 3)), _box(grid, slice(3, 6), slice(3, 6))
    logits = torch.stack([b, a, torch.zeros(grid)]).flatten(1) * 20 - 10
    queries, targets = hungarian_match(torch.zeros(3), logits, torch.stack([a, b]).flatten(1))
    assert dict(zip(queries.tolist(), targets.tolist(), strict=True)) == {0: 1, 1: 0}


def test_select_instances_suppresses_duplicates_and_keeps_masks_disjoint() -> None:
    grid = (8, 8)
    big = _box(grid, slice(0, 6), slice(0, 6)) * 0.9 + 0.05
    twin = _box(grid, slice(0, 6), slice(0, 5)) * 0.9 + 0.05  # IoU 30/36 with big
    overlapping = _box(grid, slice(4, 8), slice(4, 8)) * 0.9 + 0.05  # 4 of 16 patches in big
    faint = _box(grid, slice(6, 8), slice(0, 2)) * 0.9 + 0.05
    prediction = Prediction(
        torch.stack([big, twin, overlapping, faint]), torch.tensor([0.9, 0.8, 0.7, 0.01])
    )
    kept = select_instances(prediction, InstanceApplyConfig(min_score=0.05, nms_iou=0.5))
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7])
    binary = kept.probabilities > 0.5
    assert not bool((binary[0] & binary[1]).any())
    assert int(binary[1].sum()) == 12  # the patches big holds are left to big
    capped = select_instances(prediction, InstanceApplyConfig(max_instances=1, min_score=0.05))
    assert len(capped.scores) == 1


def test_correct_image_replaces_drops_and_adds_by_the_stated_rules() -> None:
    grid = (8, 8)
    matched = _box(grid, slice(0, 4), slice(0, 4))
    doubted = _box(grid, slice(5, 8), slice(0, 3))
    kept_as_is = _box(grid, slice(0, 2), slice(6, 8))
    teacher_fix = _box(grid, slice(0, 4), slice(0, 5))  # IoU 16/20 with matched
    teacher_new = _box(grid, slice(5, 8), slice(5, 8))
    prediction = Prediction(
        torch.stack([teacher_fix, teacher_new, doubted, kept_as_is]),
        torch.tensor([0.9, 0.8, 0.1, 0.3]),
    )
    config = InstanceTrainConfig(keep_score=0.7, drop_score=0.2, match_iou=0.5)
    targets, change = correct_image(torch.stack([matched, doubted, kept_as_is]), prediction, config)
    assert (change.replaced, change.dropped, change.added) == (1, 1, 1)
    assert torch.equal(targets[0], teacher_fix)  # replaced by the teacher's mask
    assert torch.equal(targets[1], kept_as_is)  # scored 0.3 >= drop_score: kept
    assert torch.equal(targets[2], teacher_new)  # a missed object, added


def test_train_rounds_is_deterministic_and_records_every_round() -> None:
    generator = torch.Generator().manual_seed(0)
    images = []
    for index in range(3):
        tokens = torch.randn(6, 8, 16, generator=generator)
        target = _box((6, 8), slice(1, 4), slice(index, index + 3))
        tokens[1:4, index : index + 3, :4] += 3.0
        images.append(InstanceImage(str(index), tokens.half(), target[None]))
    config = InstanceTrainConfig(epochs=3, batch_size=2, hidden=16, heads=2, queries=5, rounds=1)
    first, history = train_rounds(
        [InstanceImage(i.file_name, i.tokens, i.targets) for i in images], config
    )
    second, _ = train_rounds(images, config)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert [record["round"] for record in history] == [0, 1]
    assert {"pseudo_masks", "replaced", "dropped", "added", "losses", "seconds"} <= set(history[1])
    assert all(np.isfinite(v) for v in history[1]["losses"].values())


def test_token_flip_learns_every_image_mirrored_on_the_grid_too() -> None:
    tokens = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(0))
    target = _box((4, 6), slice(0, 3), slice(0, 2))
    image = InstanceImage("a.jpg", tokens.half(), target[None])
    flipped = mirrored(image)
    assert torch.equal(flipped.tokens[:, 0], image.tokens[:, 5])
    assert torch.equal(flipped.targets[0], _box((4, 6), slice(0, 3), slice(4, 6)))
    small = InstanceTrainConfig(epochs=1, hidden=16, heads=2, queries=3, rounds=0)
    _, history = train_rounds([image], small)
    assert (history[0]["images"], history[0]["pseudo_masks"]) == (2, 2)
    _, history = train_rounds([image], replace(small, token_flip=False))
    assert (history[0]["images"], history[0]["pseudo_masks"]) == (1, 1)


@pytest.fixture(scope="module")
def instances_run(
    coco_images: Path, real_backbone: Backbone, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``run --mode instances`` on the coco images (224 px, no refinement)."""
    out = tmp_path_factory.mktemp("runs") / "instances"
    config = RunConfig(
        resolution=224, workers=1, refine="none", segment=InstancesConfig(max_instances=5)
    )
    label_folder(coco_images, out, config, backbone=real_backbone)
    return out


def _masks(run_dir: Path) -> dict[str, list[tuple[np.ndarray, float]]]:
    found = {}
    for image, anns in read_run(run_dir).images():
        size = (image["height"], image["width"])
        found[image["file_name"]] = [
            (decode_rle(ann["segmentation"], size), ann["score"]) for ann in anns
        ]
    return found


def test_real_instance_head_writes_scored_disjoint_instances_and_resumes(
    coco_multi_object: tuple[str, ...],
    instances_run: Path,
    coco_images: Path,
    real_backbone: Backbone,
    tmp_path: Path,
) -> None:
    result = distil_instances(instances_run, tmp_path / "head.pt", SMALL, backbone=real_backbone)
    loaded = load_checkpoint(result.checkpoint)
    assert isinstance(loaded.head, InstanceHead) and loaded.meta["task"] == "instances"
    # every image is learnt mirrored on the grid too (token_flip): twice the run's masks
    assert loaded.meta["rounds"][0]["pseudo_masks"] == 2 * result.pseudo_masks > 0
    out = tmp_path / "applied"
    config = RunConfig(resolution=224, workers=1, refine="none")
    summary = apply_head(result.checkpoint, coco_images, out, config, backbone=real_backbone)
    assert summary.labelled == len(coco_multi_object)
    found = _masks(out)
    # several instances on a multi-object image (the 224 px MaskCut run it learns from gives
    # 1-3 pseudo-masks per image)
    assert max(len(masks) for masks in found.values()) >= 2
    for masks in found.values():
        scores = [score for _, score in masks]
        assert scores == sorted(scores, reverse=True)
        for i, (first, _) in enumerate(masks):
            for second, _ in masks[i + 1 :]:
                assert not (first & second).any()
    before = read_run(out).coco["annotations"]
    again = apply_head(result.checkpoint, coco_images, out, config, backbone=real_backbone)
    assert again.resumed == len(coco_multi_object) and again.labelled == 0
    assert read_run(out).coco["annotations"] == before


def test_cli_trains_the_instance_head_by_default_on_an_instances_run(
    coco_multi_object: tuple[str, ...], instances_run: Path, coco_images: Path, tmp_path: Path
) -> None:
    # the run's features are cached by the test above or computed here from the run's weights
    out = tmp_path / "head.pt"
    result = CliRunner().invoke(
        app,
        ["train", str(instances_run), "--out", str(out), "--epochs", "2", "--rounds", "1"]
        + ["--no-token-flip"],
    )
    assert result.exit_code == 0, result.output
    meta = load_checkpoint(out).meta
    assert meta["task"] == "instances" and [r["round"] for r in meta["rounds"]] == [0, 1]
    assert meta["training"]["token_flip"] is False
    assert meta["rounds"][0]["images"] == len(coco_multi_object)  # no mirrored copies
    assert "round" in result.output and "pseudo-masks" in result.output
    refused = CliRunner().invoke(
        app,
        [
            "train",
            str(instances_run),
            "--out",
            str(tmp_path / "x.pt"),
            "--layers",
            "8,11",
        ],
    )
    assert refused.exit_code != 0 and "--layers" in refused.output
    applied = tmp_path / "applied"
    result = CliRunner().invoke(
        app,
        ["apply", str(out), str(coco_images), "--out", str(applied), "--refine", "none"]
        + ["--max-instances", "2", "--min-score", "0", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    run = read_run(applied)
    assert run.options["max_instances"] == 2 and run.options["task"] == "instances"
    assert all(len(anns) <= 2 for _, anns in run.images())


def test_entities_parts_are_learnt_apart_from_their_entities(tmp_path: Path) -> None:
    entity = np.zeros((20, 30), dtype=bool)
    entity[2:12, 3:20] = True
    part = entity.copy()
    part[2:12, 10:20] = False
    records = [
        annotation_record(entity, 0.9, {"level": 0}),
        annotation_record(part, 0.8, {"level": 1, "parent": 0}),
    ]
    write_coco_stream(
        tmp_path / "annotations.json",
        [{"file_name": "a.jpg", "width": 30, "height": 20, "annotations": records}],
    )
    run = read_run(tmp_path, require_provenance=False)
    [(name, width, height, objects, parts)] = list(level_masks(run))
    assert (name, width, height) == ("a.jpg", 30, 20)
    assert len(objects) == 1 and np.array_equal(objects[0], entity)
    assert len(parts) == 1 and np.array_equal(parts[0], part)


def test_select_parts_keeps_parts_inside_their_object() -> None:
    grid = (8, 8)
    left = _box(grid, slice(0, 8), slice(0, 4)) * 0.9 + 0.05
    right = _box(grid, slice(0, 8), slice(4, 8)) * 0.9 + 0.05
    objects = Prediction(torch.stack([left, right]), torch.tensor([0.9, 0.8]))
    spill = _box(grid, slice(0, 3), slice(2, 5)) * 0.9 + 0.05  # 6 of 9 patches in left
    whole = left.clone()  # the object again: not a part
    small = _box(grid, slice(5, 7), slice(5, 7)) * 0.9 + 0.05
    parts = Prediction(torch.stack([spill, whole, small]), torch.tensor([0.7, 0.6, 0.5]))
    found = select_parts(objects, parts, InstanceApplyConfig(min_score=0.05))
    assert [parent for parent, _ in found] == [0, 1]
    [(_, in_left), (_, in_right)] = found
    assert in_left.scores.tolist() == pytest.approx([0.7])
    assert int((in_left.probabilities[0] > 0.5).sum()) == 6  # clipped to the left object
    assert bool(((in_left.probabilities > 0.5) <= (left > 0.5)).all())
    assert in_right.scores.tolist() == pytest.approx([0.5])


def test_review_shows_an_instance_head_run_like_an_instances_run(
    instances_run: Path, coco_images: Path, real_backbone: Backbone, tmp_path: Path
) -> None:
    # touches FiftyOne: run under flock /work/wt/fiftyone.lock
    from selfment_label.review.dataset import build_dataset
    from selfment_label.review.views import SEVERAL_INSTANCES_VIEW

    config = InstanceTrainConfig(epochs=2, rounds=0)
    result = distil_instances(instances_run, tmp_path / "head.pt", config, backbone=real_backbone)
    out = tmp_path / "applied"
    run_config = RunConfig(resolution=224, workers=1, refine="none")
    apply_head(result.checkpoint, coco_images, out, run_config, backbone=real_backbone)
    dataset = build_dataset(out, f"instance-head-{tmp_path.name}")
    try:
        assert SEVERAL_INSTANCES_VIEW in dataset.list_saved_views()
    finally:
        dataset.delete()


def test_training_refuses_a_run_without_masks_and_a_diverged_loss(
    instances_run: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    shutil.copytree(instances_run, empty)
    coco = json.loads((empty / "annotations.json").read_text())
    coco["annotations"] = []
    (empty / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(HeadError, match="has a mask"):
        distil_instances(empty, tmp_path / "head.pt", SMALL)
    tokens = torch.full((4, 4, 8), float("nan")).half()
    images = [InstanceImage("a", tokens, _box((4, 4), slice(0, 2), slice(0, 2))[None])]
    with pytest.raises(HeadError, match="diverged"):
        train_rounds(images, InstanceTrainConfig(epochs=1, hidden=8, heads=2, queries=2))
    assert not (tmp_path / "head.pt").exists()


def test_real_head_on_an_entities_run_writes_parts_inside_their_entity(
    coco_images: Path, real_backbone: Backbone, tmp_path: Path
) -> None:
    run = tmp_path / "entities"
    config = RunConfig(resolution=224, workers=1, refine="none", segment=EntitiesConfig())
    label_folder(coco_images, run, config, backbone=real_backbone)
    result = distil_instances(run, tmp_path / "head.pt", SMALL, backbone=real_backbone)
    loaded = load_checkpoint(result.checkpoint)
    assert loaded.meta["model"]["part_queries"] == SMALL.part_queries
    assert loaded.meta["data"]["parts"] > 0
    out = tmp_path / "applied"
    apply_head(result.checkpoint, coco_images, out, config, backbone=real_backbone)
    assert read_run(out).options["parts"] is True  # review shows it like an entities run
    parts = 0
    for image, anns in read_run(out).images():
        size = (image["height"], image["width"])
        by_id = {ann["id"]: ann for ann in anns}
        for ann in anns:
            if ann.get("parent_id") is None:
                assert ann["level"] == 0
                continue
            parent = by_id[ann["parent_id"]]
            assert ann["level"] == 1 and parent["level"] == 0
            inside = decode_rle(ann["segmentation"], size)
            assert not (inside & ~decode_rle(parent["segmentation"], size)).any()
            parts += 1
    assert parts > 0


def test_train_reviewed_learns_the_reviewed_instances(
    coco_multi_object: tuple[str, ...], instances_run: Path, real_backbone: Backbone, tmp_path: Path
) -> None:
    # touches FiftyOne: run under flock /work/wt/fiftyone.lock
    from selfment_label.review.dataset import build_dataset
    from selfment_label.review.targets import reviewed_targets

    dataset = build_dataset(instances_run, f"reviewed-instances-{tmp_path.name}")
    try:
        rejected, *others = dataset.sort_by("file_name")
        rejected.tags.append("rejected")
        rejected.save()
        trimmed = max(others, key=lambda sample: len(sample.pseudo.detections))
        kept = trimmed.pseudo.detections[:-1]  # one instance deleted in review
        trimmed.pseudo.detections = kept
        trimmed.save()
        source = reviewed_targets(instances_run, dataset.name)
        objects = {name: masks for name, _, _, masks, _ in source.instances}
        assert rejected.file_name not in objects
        assert len(objects[trimmed.file_name]) == len(kept)
        out = tmp_path / "head.pt"
        result = CliRunner().invoke(
            app,
            ["train", str(instances_run), "--out", str(out), "--reviewed"]
            + ["--name", dataset.name, "--epochs", "2", "--rounds", "0"],
        )
        assert result.exit_code == 0, result.output
        meta = load_checkpoint(out).meta
        assert meta["task"] == "instances"
        assert meta["data"]["review"]["dataset"] == dataset.name
        assert meta["data"]["pseudo_masks"] == sum(len(masks) for masks in objects.values())
        assert meta["data"]["images"] == len(coco_multi_object) - 1
    finally:
        dataset.delete()

"""``--zoom``: the full view plus four corner crops, merged (``selfment_label.zoom``). The merge
rules on hand-made masks, then on real coco-dev images with the real backbone (224 px, no
refinement): more masks than the full view alone, disjoint, resumable, the Ray stages' rows
equal to a local run's, and the option's invalid combinations refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from selfment_label_cli.main import app
from typer.testing import CliRunner

from selfment_label.config import (
    EntitiesConfig,
    InstanceApplyConfig,
    InstancesConfig,
    InstanceTrainConfig,
    RunConfig,
    SingleConfig,
    TrainConfig,
)
from selfment_label.data.images import load_image, prepare_image
from selfment_label.distributed.stages import DecodeSettings, LabelActor, decode_images
from selfment_label.engine import Labeller
from selfment_label.features.backbone import Backbone
from selfment_label.head.apply import apply_head
from selfment_label.head.checkpoint import HeadError
from selfment_label.head.instance_train import distil_instances
from selfment_label.head.train import distil
from selfment_label.masks import FullSizeMask
from selfment_label.refine import guide_side
from selfment_label.review.convert import detection_to_mask
from selfment_label.review.model import selfment_model
from selfment_label.runfolder.coco import decode_rle
from selfment_label.runfolder.journal import RunConflict
from selfment_label.runfolder.label import label_folder
from selfment_label.runfolder.layout import read_run
from selfment_label.segment.registry import make_segmenter
from selfment_label.timing import StageTimer
from selfment_label.zoom import CROP_SCORE, Crop, corner_crops, crop_views, merge_views

ZOOM = 0.6


def _full(height: int, width: int, rows: slice, cols: slice, score: float) -> FullSizeMask:
    mask = np.zeros((height, width), dtype=bool)
    mask[rows, cols] = True
    return FullSizeMask(mask=mask, score=score, extra={})


def test_corner_crops_cover_the_image_from_its_four_corners() -> None:
    crops = corner_crops(100, 50, 0.6)
    assert [(c.left, c.top, c.width, c.height) for c in crops] == [
        (0, 0, 60, 30),
        (40, 0, 60, 30),
        (0, 20, 60, 30),
        (40, 20, 60, 30),
    ]
    covered = np.zeros((50, 100), dtype=bool)
    for crop in crops:
        covered[crop.window()] = True
    assert covered.all()
    # a crop's guide at another scale (here half the size) is the same region
    guide = np.arange(25 * 50 * 3).reshape(25, 50, 3)
    assert crops[3].of(guide).shape == (15, 30, 3)
    assert (crops[3].of(guide) == guide[10:25, 20:50]).all()


def test_a_crop_mask_that_runs_into_an_inner_edge_of_its_crop_is_told() -> None:
    crop = Crop(left=4, top=0, width=6, height=5, image_width=10, image_height=8)
    full = np.zeros((8, 10), dtype=bool)
    inside = np.zeros((5, 6), dtype=bool)
    inside[1:3, 2:4] = True
    full[crop.window()] = inside
    assert full.sum() == 4 and full[1:3, 6:8].all()
    assert not crop.inner_edge_touched(inside)
    on_image_edge = np.zeros((5, 6), dtype=bool)
    on_image_edge[0, 2] = on_image_edge[2, 5] = True  # the image's top and right edges
    assert not crop.inner_edge_touched(on_image_edge)
    cut = np.zeros((5, 6), dtype=bool)
    cut[4, 3] = True  # the crop's bottom edge lies inside the image
    assert crop.inner_edge_touched(cut)
    cut = np.zeros((5, 6), dtype=bool)
    cut[2, 0] = True  # so does its left edge
    assert crop.inner_edge_touched(cut)


def test_merge_adds_whole_new_crop_objects_disjoint_and_ranked_after_the_full_view() -> None:
    height, width = 50, 100
    full = [_full(height, width, slice(5, 20), slice(5, 30), 0.9)]
    crop = corner_crops(width, height, 0.6)[1]  # top right: columns 40-100, rows 0-30
    size = (crop.height, crop.width)

    def crop_mask(rows: slice, cols: slice, score: float) -> FullSizeMask:
        mask = np.zeros(size, dtype=bool)
        mask[rows, cols] = True
        return FullSizeMask(mask=mask, score=score, extra={})

    new = crop_mask(slice(5, 15), slice(30, 45), 0.8)  # inside the crop: a new object
    cut = crop_mask(slice(5, 15), slice(0, 10), 0.95)  # touches the crop's inner left edge
    image_edge = crop_mask(slice(0, 5), slice(50, 60), 0.7)  # touches the image's own edges
    again = crop_mask(slice(5, 15), slice(31, 45), 0.75)  # the new object found twice
    merged = merge_views(full, [(crop, [new, cut, image_edge, again])])
    assert (merged[0].mask == full[0].mask).all()
    assert [round(m.score, 4) for m in merged[1:]] == [
        round(CROP_SCORE * 0.8, 4),
        round(CROP_SCORE * 0.7, 4),
    ]
    assert merged[1].mask[5:15, 70:85].all() and merged[1].mask.sum() == 150
    total = np.sum([m.mask for m in merged], axis=0)
    assert total.max() == 1


def test_merge_gives_a_pixel_to_the_smallest_mask_and_drops_one_mostly_taken() -> None:
    height, width = 40, 40
    small = _full(height, width, slice(0, 10), slice(0, 10), 0.5)
    group = _full(height, width, slice(30, 40), slice(0, 40), 0.6)
    crop = Crop(0, 0, 40, 40, 40, 40)  # the whole image: no inner edge

    def crop_mask(rows: slice, cols: slice, score: float) -> FullSizeMask:
        return _full(height, width, rows, cols, score)

    around = crop_mask(slice(0, 20), slice(0, 20), 0.9)  # holds the small full-view object
    left = crop_mask(slice(30, 40), slice(0, 15), 0.8)  # two objects of the group
    right = crop_mask(slice(30, 40), slice(15, 30), 0.7)
    merged = merge_views([small, group], [(crop, [around, left, right])])
    assert [m.mask.sum() for m in merged] == [100, 300, 150, 150]
    assert (merged[0].mask == small.mask).all()  # the smallest keeps every pixel it claims
    assert not merged[1].mask[0:10, 0:10].any()  # the crop mask around it gives them up
    # the group, left with a quarter of itself, is dropped; its objects stay
    assert (merged[2].mask == left.mask).all() and (merged[3].mask == right.mask).all()
    assert np.sum([m.mask for m in merged], axis=0).max() == 1


CONFIG = RunConfig(resolution=224, workers=1, refine="none", segment=InstancesConfig())


@pytest.fixture(scope="module")
def runs(
    coco_images: Path, real_backbone: Backbone, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """``run --mode instances`` on the coco images without and with ``--zoom``."""
    root = tmp_path_factory.mktemp("runs")
    label_folder(coco_images, root / "plain", CONFIG, backbone=real_backbone)
    label_folder(coco_images, root / "zoom", replace(CONFIG, zoom=ZOOM), backbone=real_backbone)
    return root / "plain", root / "zoom"


def _masks(run_dir: Path) -> dict[str, list[np.ndarray]]:
    return {
        image["file_name"]: [
            decode_rle(ann["segmentation"], (image["height"], image["width"])) for ann in anns
        ]
        for image, anns in read_run(run_dir).images()
    }


def test_zoom_finds_more_disjoint_masks_than_the_full_view(
    coco_multi_object: tuple[str, ...], runs: tuple[Path, Path]
) -> None:
    plain, zoomed = (_masks(run) for run in runs)
    assert sum(map(len, zoomed.values())) > sum(map(len, plain.values()))
    assert any(len(zoomed[name]) > len(plain[name]) for name in coco_multi_object)
    for image, anns in read_run(runs[1]).images():
        masks = zoomed[image["file_name"]]
        for mask in masks:
            assert mask.shape == (image["height"], image["width"]) and mask.any()
        if masks:
            assert np.sum(masks, axis=0).max() == 1, f"{image['file_name']}: masks overlap"
        assert all(0 <= ann["score"] <= 1 for ann in anns)
    options = read_run(runs[1]).options
    assert options["zoom"] == ZOOM and options["mode"] == "instances"
    assert read_run(runs[0]).options["zoom"] is None


def test_a_zoomed_run_resumes_and_refuses_other_zoom_settings(
    coco_multi_object: tuple[str, ...],
    runs: tuple[Path, Path],
    coco_images: Path,
    real_backbone: Backbone,
) -> None:
    zoomed = runs[1]
    before = read_run(zoomed).coco["annotations"]
    config = replace(CONFIG, zoom=ZOOM)
    again = label_folder(coco_images, zoomed, config, backbone=real_backbone)
    assert again.resumed == len(coco_multi_object) and again.labelled == 0
    assert read_run(zoomed).coco["annotations"] == before
    for other in (None, 0.5):
        with pytest.raises(RunConflict):
            label_folder(
                coco_images,
                zoomed,
                replace(CONFIG, zoom=other),
                backbone=real_backbone,
            )


def test_the_ray_stages_label_a_zoomed_image_as_this_process_does(
    coco_multi_object: tuple[str, ...], coco_images: Path, real_backbone: Backbone
) -> None:
    """The decode and label stages of ``--ray`` (run here without a cluster) carry the crops
    and give the annotations of the same image labelled in this process."""
    labeller = Labeller(real_backbone, make_segmenter(CONFIG.segment), refine="none", zoom=ZOOM)
    mean, std = real_backbone.mean_std
    patch = real_backbone.patch_size
    settings = DecodeSettings(224, patch, mean, std, CONFIG.max_pixels, guide_side("none"), ZOOM)
    name = coco_multi_object[1]
    rows = {
        "file_name": np.array([name], dtype=object),
        "data": np.array([(coco_images / name).read_bytes()], dtype=object),
        "error": np.array([""], dtype=object),
        "read_seconds": np.zeros(1),
    }
    decoded = decode_images(rows, settings)
    labelled = LabelActor(labeller, "cpu", None, False, 2)(decoded)
    record = json.loads(labelled["record"][0])
    item = prepare_image(coco_images, name, 224, patch, mean, std, zoom=ZOOM)
    assert item.zoom_pixels is not None and item.zoom_pixels.shape == (4, *item.pixels.shape)
    (here,) = labeller.label([item], StageTimer("cpu"))
    assert len(here.annotations) > 0
    assert record["annotations"] == here.annotations


def test_crops_keep_full_resolution_when_the_image_is_decoded_at_a_draft_scale(
    coco_multi_object: tuple[str, ...],
    coco_dir: Path,
) -> None:
    image, size = load_image(coco_dir / "images" / coco_multi_object[0])
    views = crop_views(image, size, ZOOM, (224, 168))
    assert [view.size for view in views] == [(224, 168)] * 4
    # the top-left crop's top-left corner is the image's
    assert np.allclose(
        np.asarray(views[0])[0, 0].astype(int), np.asarray(image)[0, 0].astype(int), atol=40
    )


def test_apply_zooms_an_instance_head_and_refuses_others(
    runs: tuple[Path, Path], coco_images: Path, real_backbone: Backbone, tmp_path: Path
) -> None:
    small = InstanceTrainConfig(epochs=2, hidden=16, heads=2, queries=10, rounds=0)
    head = distil_instances(runs[1], tmp_path / "head.pt", small, backbone=real_backbone)
    select = InstanceApplyConfig(min_score=0.0)
    config = RunConfig(resolution=224, workers=1, refine="none", zoom=ZOOM)
    out = tmp_path / "applied"
    apply_head(head.checkpoint, coco_images, out, config, backbone=real_backbone, instances=select)
    run = read_run(out)
    assert run.options["zoom"] == ZOOM and run.options["task"] == "instances"
    for masks in _masks(out).values():
        if masks:
            assert np.sum(masks, axis=0).max() == 1
    with pytest.raises(ValueError, match="instances mode or an instance head"):
        Labeller(real_backbone, make_segmenter(SingleConfig()), zoom=ZOOM)
    with pytest.raises(ValueError, match="instances mode or an instance head"):
        Labeller(real_backbone, make_segmenter(EntitiesConfig()), zoom=ZOOM)


def test_cli_refuses_zoom_where_it_cannot_merge(coco_images: Path, tmp_path: Path) -> None:
    base = ["run", str(coco_images), "--out", str(tmp_path / "o"), "--offline"]
    cases = {
        ("--zoom",): "--mode single",
        ("--zoom", "--mode", "entities"): "--mode entities",
        ("--mode", "instances", "--zoom-crop", "0.5"): "pass --zoom too",
        ("--mode", "instances", "--zoom", "--zoom-crop", "0.95"): "zoom must be in",
    }
    for args, said in cases.items():
        result = CliRunner().invoke(app, [*base, *args])
        assert result.exit_code == 2, result.output
        assert said in " ".join(result.output.split()), result.output
    assert not (tmp_path / "o").exists()


def test_apply_refuses_zoom_for_a_single_object_head(
    coco_images: Path, real_backbone: Backbone, tmp_path: Path
) -> None:
    run = tmp_path / "single"
    label_folder(
        coco_images,
        run,
        RunConfig(resolution=112, workers=1, refine="none"),
        backbone=real_backbone,
    )
    head = distil(
        run, tmp_path / "single.pt", TrainConfig(epochs=1, rounds=0), backbone=real_backbone
    )
    with pytest.raises(HeadError, match="zoom needs an instance head"):
        apply_head(
            head.checkpoint,
            coco_images,
            tmp_path / "x",
            RunConfig(resolution=112, zoom=ZOOM),
            backbone=real_backbone,
        )


def test_the_fiftyone_model_zooms_as_a_run_does(
    coco_multi_object: tuple[str, ...],
    runs: tuple[Path, Path],
    coco_images: Path,
    real_backbone: Backbone,
) -> None:
    """``selfment_model`` with a zoom labels an image's crops too: the zoomed run's masks."""
    name = coco_multi_object[1]
    model = selfment_model(replace(CONFIG, zoom=ZOOM), backbone=real_backbone)
    image, size = load_image(coco_images / name)
    detections = model.predict(np.asarray(image)).detections
    found = [detection_to_mask(d, *size) for d in detections]
    zoomed, plain = _masks(runs[1])[name], _masks(runs[0])[name]
    assert len(found) == len(zoomed) > len(plain)
    for mask, run_mask in zip(found, zoomed, strict=True):
        assert (mask & run_mask).sum() / (mask | run_mask).sum() >= 0.95
    with pytest.raises(ValueError, match="zoom merges flat, disjoint instances"):
        selfment_model(replace(CONFIG, segment=SingleConfig(), zoom=ZOOM), backbone=real_backbone)

"""Exports, checked with the tools that consume them: pycocotools, torchvision's CocoDetection
and Mask R-CNN, and Ultralytics (its label checker and one training epoch on the CPU).

Run folders are made with the tiny random ViT on real ECSSD images (the masks are arbitrary
but real engine output, often in several pieces), against the real embedded FiftyOne database.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import copy_ecssd, datasets_deleted_after_module, ecssd_stems, label_tiny
from PIL import Image
from pycocotools.coco import COCO

from selfment_label.evaluate import evaluate_run
from selfment_label.features.backbone import Backbone
from selfment_label.review.convert import detection_to_mask
from selfment_label.review.dataset import build_dataset
from selfment_label.review.db import ReviewError
from selfment_label.review.export import (
    MARKER_NAME,
    ExportError,
    distinct_stems,
    export_dataset,
    safe_relative_path,
)
from selfment_label.review.split import hash_splits, tag_splits
from selfment_label.review.yolo import dataset_yaml, label_rows, mask_polygon, yolo_image_name
from selfment_label.runfolder.coco import load_coco

fo = pytest.importorskip("fiftyone")
# Ultralytics must never reach the network nor write to the user's settings.
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="selfment-test-ultralytics-"))
os.environ["YOLO_OFFLINE"] = "1"
SUFFIX = uuid.uuid4().hex[:8]
N_IMAGES = 8


@pytest.fixture(autouse=True)
def _restore_what_ultralytics_changes():
    """Put back what Ultralytics changes process-wide, after every test of this module.

    Importing it replaces ``PIL.Image.open`` (a HEIF fallback that tries to pip-install
    pi-heif on the first unidentified file) and sets ``OMP_NUM_THREADS=1``; training calls
    ``torch.set_num_threads(min(8, cores - 1))`` and toggles torch's deterministic mode.
    Later tests must see the library's real behaviour under the suite's own settings
    (conftest checks that no test leaves them changed)."""
    from PIL import Image as PILImage

    original_open = PILImage.open
    threads = torch.get_num_threads()
    omp = os.environ.get("OMP_NUM_THREADS")
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    PILImage.open = original_open
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp
    torch.use_deterministic_algorithms(deterministic)


_delete_datasets = datasets_deleted_after_module(SUFFIX)


def _dataset(run: Path, tag: str) -> fo.Dataset:
    return build_dataset(run, name=f"t-{tag}-{SUFFIX}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Backbone, ecssd_dir: Path):
    """An instances-mode run over 8 ECSSD images (half in a subfolder)."""
    root = tmp_path_factory.mktemp("export")
    copy_ecssd(ecssd_dir, root / "images", ecssd_stems(N_IMAGES), subfolders=True)
    label_tiny(root / "images", root / "run", tiny_backbone, "instances")
    return root / "run"


@pytest.fixture(scope="module")
def entities_run(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Backbone, ecssd_dir):
    """An entities-mode run (entities and parts) over 4 ECSSD images."""
    root = tmp_path_factory.mktemp("entities")
    copy_ecssd(ecssd_dir, root / "images", ecssd_stems(4), subfolders=True)
    label_tiny(root / "images", root / "run", tiny_backbone, "entities")
    return root / "run"


def _dataset_masks(dataset: fo.Dataset, field: str = "pseudo") -> dict[str, list[np.ndarray]]:
    masks = {}
    for sample in dataset:
        width, height = sample.metadata.width, sample.metadata.height
        labels = sample[field].detections if sample[field] else []
        masks[sample.file_name] = [detection_to_mask(d, width, height) for d in labels]
    return masks


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())


# --- splits -----------------------------------------------------------------------------------


def test_hash_split_is_stable_seeded_and_near_the_fraction() -> None:
    names = [f"dir/{i:04d}.jpg" for i in range(2000)]
    splits = hash_splits(names[:1000], 0.1)
    assert 70 <= sum(s == "val" for s in splits.values()) <= 130
    grown = hash_splits(names, 0.1)
    assert all(grown[name] == split for name, split in splits.items())
    assert hash_splits(reversed(names[:1000]), 0.1) == splits
    assert hash_splits(names[:1000], 0.1, seed=1) != splits
    assert set(hash_splits(names, 0.0).values()) == {"train"}
    assert list(hash_splits(["a.jpg", "b.jpg"], 0.1).values()).count("val") == 1
    assert hash_splits(["a.jpg"], 0.5) in ({"a.jpg": "train"}, {"a.jpg": "val"})
    with pytest.raises(ValueError):
        hash_splits(names, 1.0)


def test_tag_split() -> None:
    splits = tag_splits({"a": ["val"], "b": ["train", "approved"], "c": []})
    assert splits == {"a": "val", "b": "train", "c": "train"}
    with pytest.raises(ValueError, match="both"):
        tag_splits({"a": ["train", "val"]})


# --- names ------------------------------------------------------------------------------------


def test_safe_relative_path() -> None:
    assert safe_relative_path("../../etc/passwd") == "etc/passwd"
    assert safe_relative_path("/abs/x.jpg") == "abs/x.jpg"
    assert safe_relative_path("a\\..\\..\\b.png") == "a/b.png"
    assert safe_relative_path("C:\\x.png") == "C_/x.png"
    assert safe_relative_path("..") == "image"


def test_distinct_stems_keep_the_extension_only_on_collision() -> None:
    stems = distinct_stems(["a.jpg", "a.PNG", "b.jpg", "sub/a.jpg", "a.jpg.png"])
    assert stems["b.jpg"] == "b" and stems["sub/a.jpg"] == "sub/a"
    assert stems["a.jpg"] == "a.jpg" and stems["a.PNG"] == "a.PNG"
    assert len({s.lower() for s in stems.values()}) == len(stems)
    assert yolo_image_name("images/x/images/a") == "images_/x/images_/a"


# --- YOLO polygons ----------------------------------------------------------------------------


def _fill(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    canvas = np.zeros(shape, dtype=np.uint8)
    cv2.fillPoly(canvas, [np.round(polygon - 0.5).astype(np.int32)], 1)
    return canvas.astype(bool)


def test_mask_pieces_join_into_one_polygon() -> None:
    mask = np.zeros((60, 80), dtype=bool)
    mask[5:25, 5:25] = True
    mask[30:55, 40:75] = True
    mask[2:4, 70:72] = True  # 4 pixels: below the minimum, dropped
    mask[40, 2:30] = True  # a one-pixel line of 28 pixels: kept
    polygon = mask_polygon(mask, min_piece_area=16)
    assert polygon is not None and len(polygon) >= 3
    filled = _fill(polygon, mask.shape)
    assert filled[5:25, 5:25].all() and filled[30:55, 40:75].all() and filled[40, 2:30].all()
    assert not filled[2:4, 70:72].any()
    assert (filled & ~mask).sum() < 0.05 * mask.sum()  # only the zero-width bridges
    rows = label_rows([mask, np.zeros_like(mask)], 80, 60)
    assert len(rows) == 1


@pytest.mark.parametrize("pixels", [[(3, 4)], [(3, 4), (3, 5)], [(3, 4), (4, 5)]])
def test_tiny_masks_still_give_a_valid_row(pixels: list[tuple[int, int]]) -> None:
    mask = np.zeros((10, 10), dtype=bool)
    for y, x in pixels:
        mask[y, x] = True
    (row,) = label_rows([mask], 10, 10)
    values = row.split()
    assert values[0] == "0" and len(values) >= 7 and len(values) % 2 == 1
    points = np.array(values[1:], dtype=float).reshape(-1, 2)
    assert len(np.unique(points, axis=0)) >= 3 and ((0 <= points) & (points <= 1)).all()


def test_dataset_yaml_has_train_val_names_and_no_absolute_path() -> None:
    text = dataset_yaml(["train", "val"], ["foreground"], "x")
    assert "train: images/train\n" in text and "val: images/val\n" in text
    assert 'names:\n  0: "foreground"' in text and "path:" not in text.replace("'path:'", "")
    assert "val: images/train" in dataset_yaml(["train"], ["foreground"], "x")


# --- COCO -------------------------------------------------------------------------------------


def test_coco_export_splits_and_round_trips_every_mask(run_dir: Path, tmp_path: Path) -> None:
    dataset = _dataset(run_dir, "coco")
    samples = list(dataset.sort_by("file_name"))
    samples[0].tags.append("rejected")
    samples[0].save()
    edited = samples[2]
    edited.pseudo.detections.pop(0)
    edited.save()
    want = _dataset_masks(dataset)

    target = tmp_path / "coco"
    summary = export_dataset(dataset, target, "coco", exclude_tags=["rejected"], val_fraction=0.3)
    assert summary.images == N_IMAGES - 1 and summary.skipped == []
    assert summary.splits["train"] > 0 and summary.splits["val"] > 0
    n_annotations = 0
    for split in ("train", "val"):
        coco = COCO(str(target / "annotations" / f"instances_{split}.json"))
        assert len(coco.dataset["images"]) == summary.splits[split]
        assert coco.dataset["info"]["image_root"] == f"images/{split}"
        for image in coco.dataset["images"]:
            name = image["file_name"]
            assert name != samples[0].file_name
            assert (target / "images" / split / name).is_file()
            got = [coco.annToMask(a).astype(bool) for a in coco.imgToAnns[image["id"]]]
            assert len(got) == len(want[name])
            for g, w in zip(got, want[name], strict=True):
                assert np.array_equal(g, w)
            n_annotations += len(got)
        for ann in coco.dataset["annotations"]:
            assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
    assert summary.annotations == n_annotations
    again = tmp_path / "again"
    export_dataset(dataset, again, "coco", exclude_tags=["rejected"], val_fraction=0.3)
    assert (again / "annotations" / "instances_val.json").read_text().split('"licenses"')[1] == (
        target / "annotations" / "instances_val.json"
    ).read_text().split('"licenses"')[1]

    with pytest.raises(ReviewError, match="not empty"):
        export_dataset(dataset, target, "coco")
    export_dataset(
        dataset, target, "coco", polygons=True, media="none", overwrite=True, val_fraction=0
    )
    assert sorted(p.name for p in target.iterdir()) == [MARKER_NAME, "annotations"]
    poly = load_coco(target / "annotations" / "instances_train.json")
    assert len(poly["images"]) == N_IMAGES
    assert poly["info"]["image_root"] == dataset.info["selfment"]["input_dir"]
    assert all(isinstance(a["segmentation"], list) for a in poly["annotations"])


def test_coco_export_trains_torchvision_mask_rcnn(run_dir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    datasets = pytest.importorskip("torchvision.datasets")
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    from torchvision.transforms.v2 import functional as F

    target = tmp_path / "coco"
    export_dataset(_dataset(run_dir, "tv"), target, "coco", val_fraction=0.3)
    coco = datasets.CocoDetection(
        str(target / "images" / "train"), str(target / "annotations" / "instances_train.json")
    )
    wrapped = datasets.wrap_dataset_for_transforms_v2(
        coco, target_keys=("boxes", "labels", "masks", "image_id")
    )
    images, targets = [], []
    for image, target_dict in wrapped:
        if len(target_dict.get("boxes", [])):
            images.append(F.to_dtype(F.to_image(image), torch.float32, scale=True))
            targets.append({k: target_dict[k] for k in ("boxes", "labels", "masks")})
        if len(images) == 2:
            break
    assert len(images) == 2
    assert targets[0]["masks"].shape[-2:] == images[0].shape[-2:]
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=2, min_size=160, max_size=224
    )
    model.train()
    losses = model(images, targets)
    assert {"loss_mask", "loss_box_reg", "loss_classifier"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_entities_in_every_format(entities_run: Path, tmp_path: Path) -> None:
    dataset = _dataset(entities_run, "ent")
    source = load_coco(entities_run / "annotations.json")["annotations"]
    export_dataset(dataset, tmp_path / "coco", "coco", val_fraction=0)
    written = load_coco(tmp_path / "coco" / "annotations" / "instances_train.json")["annotations"]
    by_id = {a["id"]: a for a in written}
    assert len(written) == len(source)
    for ann in written:
        if ann["level"] == 1 and ann.get("parent_id") is not None:
            parent = by_id[ann["parent_id"]]
            assert parent["level"] == 0 and parent["image_id"] == ann["image_id"]
    assert sum("parent_id" in a for a in written) == sum("parent_id" in a for a in source)

    summary = export_dataset(dataset, tmp_path / "yolo", "yolo", val_fraction=0)
    assert summary.annotations == sum(a["level"] == 0 for a in source)
    masks = export_dataset(dataset, tmp_path / "masks", "masks", val_fraction=0, media="none")
    entities = _files(tmp_path / "masks" / "masks" / "train")
    parts = _files(tmp_path / "masks" / "parts" / "train")
    assert len(entities) == len(parts) == 4 and masks.annotations == 8
    for path in parts:
        name = str(path.relative_to(tmp_path / "masks" / "parts" / "train"))
        sample = dataset.match({"file_name": name.replace(".png", ".jpg")}).first()
        union = np.any(_dataset_masks(dataset, "parts")[sample.file_name] or [False], axis=0)
        assert np.array_equal(np.asarray(Image.open(path)) == 255, union)


# --- YOLO with Ultralytics --------------------------------------------------------------------


def _verify_labels(root: Path) -> list[tuple]:
    from ultralytics.data.utils import img2label_paths, verify_image_label

    results = []
    for image in sorted((root / "images").rglob("*.jpg")):
        (label,) = img2label_paths([str(image)])
        assert Path(label).is_file(), label
        results.append(verify_image_label((str(image), label, "", False, 1, 0, 0, False)))
    return results


def test_yolo_labels_pass_the_ultralytics_checker(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("ultralytics")
    dataset = _dataset(run_dir, "yolo")
    target = tmp_path / "yolo"
    summary = export_dataset(dataset, target, "yolo", val_fraction=0.3)
    masks = _dataset_masks(dataset)
    assert summary.annotations == sum(len(m) for m in masks.values() if m)
    results = _verify_labels(target)
    assert len(results) == N_IMAGES
    assert sum(r[8] for r in results) == 0, [r[9] for r in results if r[8]]
    assert sum(len(r[1]) for r in results) == summary.annotations
    for path in _files(target / "labels"):
        for line in path.read_text().splitlines():
            values = line.split()
            assert values[0] == "0" and len(values) >= 7 and len(values) % 2 == 1
            assert all(0.0 <= float(v) <= 1.0 for v in values[1:])
    assert not any(str(target.resolve()) in line for line in (target / "dataset.yaml").open())


def test_yolo_leaves_out_what_ultralytics_rejects(
    tmp_path: Path, tiny_backbone: Backbone, ecssd_dir: Path
) -> None:
    """Issue 22, item 12: a 2x2 image and a GIF named .png are left out of a YOLO export with
    their reasons (Ultralytics counts them corrupt); COCO keeps them."""
    pytest.importorskip("ultralytics")
    from ultralytics.data.utils import verify_image_label

    images = tmp_path / "images"
    copy_ecssd(ecssd_dir, images, ecssd_stems(2), subfolders=True)
    Image.new("RGB", (2, 2), "red").save(images / "tiny.png")
    pixels = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "anim.png", format="GIF")
    label_tiny(images, tmp_path / "run", tiny_backbone, "single")
    dataset = _dataset(tmp_path / "run", "yolo-corrupt")
    assert len(dataset) == 4
    target = tmp_path / "yolo"
    summary = export_dataset(dataset, target, "yolo", val_fraction=0)
    assert summary.images == 2 and len(summary.skipped) == 2
    reasons = " ".join(summary.skipped)
    assert "2x2 pixels" in reasons and "a GIF file" in reasons
    for image in _files(target / "images"):
        label = target / "labels" / image.relative_to(target / "images").with_suffix(".txt")
        result = verify_image_label((str(image), str(label), "", False, 1, 0, 0, False))
        assert result[8] == 0, result[9]
    assert export_dataset(dataset, tmp_path / "coco", "coco").images == 4


def test_yolo_trains_one_epoch_in_ultralytics(run_dir: Path, tmp_path: Path) -> None:
    ultralytics = pytest.importorskip("ultralytics")
    from ultralytics.data.utils import load_dataset_cache_file

    target = tmp_path / "yolo"
    export_dataset(_dataset(run_dir, "train"), target, "yolo", val_fraction=0.3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)  # the YAML's paths must not depend on the current directory
    try:
        model = ultralytics.YOLO("yolo11n-seg.yaml")
        model.train(
            data=str(target / "dataset.yaml"),
            epochs=1,
            imgsz=64,
            batch=2,
            workers=0,
            device="cpu",
            plots=False,
            amp=False,
            project=str(tmp_path / "runs"),
            name="train",
            exist_ok=True,
            verbose=False,
        )
    finally:
        os.chdir(cwd)
    for split in ("train", "val"):
        cache = load_dataset_cache_file(target / "labels" / f"{split}.cache")
        found, missing, empty, corrupt, total = cache["results"]
        assert corrupt == 0 and missing == 0 and found == total > 0, cache["msgs"]
    assert (tmp_path / "runs" / "train" / "weights" / "last.pt").is_file()


# --- masks ------------------------------------------------------------------------------------


def test_masks_names_do_not_collide_and_count_matches(tmp_path: Path, tiny_backbone) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "a.png", "b.png"):
        pixels = rng.integers(0, 60, (100, 120, 3), dtype=np.uint8)
        pixels[30:70, 40:80] = [220, 40, 40]
        Image.fromarray(pixels).save(images / name)
    label_tiny(images, tmp_path / "run", tiny_backbone, "single")
    dataset = _dataset(tmp_path / "run", "names")
    summary = export_dataset(dataset, tmp_path / "out", "masks", val_fraction=0)
    pngs = _files(tmp_path / "out" / "masks")
    assert sorted(p.name for p in pngs) == ["a.jpg.png", "a.png.png", "b.png"]
    assert summary.annotations == len(pngs) == 3
    # eval reads them back, each with its own image (issue 22, item 6)
    report = evaluate_run(tmp_path / "run", tmp_path / "out" / "masks" / "train")
    assert {row.gt_file: row.prediction for row in report.rows} == {
        "a.jpg.png": "a.jpg",
        "a.png.png": "a.png",
        "b.png": "b.png",
    }
    assert report.evaluated == 3 and not report.predictions_without_gt
    yolo = export_dataset(dataset, tmp_path / "yolo", "yolo", val_fraction=0)
    labels = _files(tmp_path / "yolo" / "labels")
    assert sorted(p.name for p in labels) == ["a.jpg.txt", "a.png.txt", "b.txt"]
    assert yolo.images == 3


# --- safety (issue 12) ------------------------------------------------------------------------


def test_targets_inside_or_holding_the_input_or_run_are_refused(run_dir: Path) -> None:
    dataset = _dataset(run_dir, "guard")
    input_dir = Path(dataset.info["selfment"]["input_dir"])
    for target in (input_dir, input_dir / "cats", run_dir, run_dir / "out", run_dir.parent):
        with pytest.raises(ExportError, match="refusing"):
            export_dataset(dataset, target, "coco", overwrite=True)
    assert not (input_dir / "cats").exists() and not (run_dir / "out").exists()


def test_overwrite_replaces_only_a_previous_export_of_ours(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 22, item 1: ``--overwrite`` never deletes a folder the export did not make."""
    from selfment_label_cli.main import app
    from typer.testing import CliRunner

    dataset = _dataset(run_dir, "marker")
    target = tmp_path / "export"
    export_dataset(dataset, target, "masks", media="none")
    assert (target / MARKER_NAME).is_file()
    summary = export_dataset(dataset, target, "yolo", media="none", overwrite=True)
    assert summary.images == N_IMAGES and not (target / "masks").exists()
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    result = CliRunner().invoke(
        app, ["export", str(run_dir), str(home), "--name", dataset.name, "--overwrite"]
    )
    assert result.exit_code == 1
    assert "not a selfment-label export" in " ".join(result.output.split())
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="holds 'notes.txt', which the export did not write"):
        export_dataset(dataset, target, "masks", overwrite=True)
    (target / "notes.txt").unlink()
    database = target / "db"
    database.mkdir()
    (database / "WiredTiger").write_text("every review")
    monkeypatch.setattr(fo.config, "database_dir", str(database))
    for folder in (target, database, tmp_path):
        with pytest.raises(ExportError, match="refusing"):
            export_dataset(dataset, folder, "masks", overwrite=True)
    assert (home / ".bashrc").read_text() == "mine"
    assert (database / "WiredTiger").read_text() == "every review"
    assert (target / "dataset.yaml").is_file()


def test_bad_options_before_the_database_and_filters_that_select_nothing(
    run_dir: Path, tmp_path: Path
) -> None:
    """Issue 22, items 17 and 18: a bad option exits 2 without reaching the database (here an
    unreachable one); tag filters that select no sample are an error naming the tags."""
    env = {
        **os.environ,
        "FIFTYONE_DATABASE_URI": "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=500",
    }
    target = tmp_path / "out"
    command = [sys.executable, "-m", "selfment_label_cli", "export", str(run_dir), str(target)]
    for option in (["--val-fraction", "nan"], ["--format", "voc"], ["--min-piece-area", "-1"]):
        failed = subprocess.run(
            [*command, *option], env=env, capture_output=True, text=True, timeout=120
        )
        assert failed.returncode == 2, failed.stderr
        assert "invalid option" in failed.stderr and "FIFTYONE" not in failed.stderr
    dataset = _dataset(run_dir, "filters").clone(f"t-filters-clone-{SUFFIX}")
    sample = dataset.first()
    sample.tags.append("approved")
    sample.save()
    with pytest.raises(ExportError, match=r"any of the tags nosuchtag; .*tags: approved \(1\)"):
        export_dataset(dataset, target, "coco", tags=["nosuchtag"])
    with pytest.raises(ExportError, match="select no sample"):
        export_dataset(dataset, target, "coco", tags=["approved"], exclude_tags=["approved"])
    assert not target.exists()


def test_media_only_from_inside_the_input_folder(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    coco = load_coco(run / "annotations.json")
    input_dir = Path(json.loads((run / "run.json").read_text())["input_dir"])
    outside = tmp_path / "secret.jpg"
    shutil.copy(input_dir / coco["images"][2]["file_name"], outside)
    (input_dir / "link.jpg").symlink_to(outside)
    traversal = os.path.relpath(outside, input_dir)
    coco["images"][0]["file_name"] = traversal
    (run / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(ReviewError, match="not a path inside the run's input folder"):
        _dataset(run, "evil")
    coco["images"][0]["file_name"] = "first.jpg"
    coco["images"][1]["file_name"] = "gone.jpg"
    coco["images"][2]["file_name"] = "link.jpg"
    (run / "annotations.json").write_text(json.dumps(coco))
    dataset = _dataset(run, "evil")
    # a dataset edited by hand: a traversal to an image (FiftyOne refuses /etc/os-release)
    crafted = dataset.match(fo.ViewField("file_name") == "first.jpg").first()
    crafted.filepath, crafted["file_name"] = str(outside), traversal
    crafted.save()
    try:
        for media in ("copy", "symlink"):
            target = tmp_path / media
            summary = export_dataset(dataset, target, "coco", media=media, val_fraction=0)
            assert summary.images == N_IMAGES - 3 and len(summary.skipped) == 3
            reasons = " ".join(summary.skipped)
            assert "is not a path inside the run's input folder" in reasons
            assert "missing" in reasons and "the run never labelled it" in reasons
            for path in _files(target):
                resolved = path.resolve()
                assert resolved.is_file()
                assert target.resolve() in resolved.parents or input_dir in resolved.parents
            assert not any(p.name in ("secret.jpg", "link.jpg") for p in _files(target))
    finally:
        (input_dir / "link.jpg").unlink()


def test_a_folder_of_links_exports_what_the_run_labelled(
    tmp_path: Path, tiny_backbone: Backbone, ecssd_dir: Path
) -> None:
    """Issue 22, item 23: links the user placed in the input are followed as ``run`` followed
    them; a changed image is left out; an export that would write nothing is refused."""
    originals, linked = tmp_path / "data", tmp_path / "subset"
    copy_ecssd(ecssd_dir, originals, ecssd_stems(3), subfolders=True)
    linked.mkdir()
    for path in sorted(originals.rglob("*.jpg")):
        (linked / path.name).symlink_to(path)
    label_tiny(linked, tmp_path / "run", tiny_backbone, "single")
    dataset = _dataset(tmp_path / "run", "links")
    summary = export_dataset(dataset, tmp_path / "out", "coco", val_fraction=0)
    assert summary.images == 3 and not summary.skipped
    for link in linked.iterdir():
        copy = tmp_path / "out" / "images" / "train" / link.name
        assert not copy.is_symlink() and copy.read_bytes() == link.read_bytes()
    first = sorted(linked.iterdir())[0]
    status = first.stat()
    os.utime(first, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    summary = export_dataset(dataset, tmp_path / "out", "coco", overwrite=True)
    assert summary.images == 2 and "changed since the run labelled it" in summary.skipped[0]
    for link in linked.iterdir():
        link.unlink()
    with pytest.raises(ExportError, match="nothing to export: none of the 3 selected images"):
        export_dataset(dataset, tmp_path / "none", "yolo")
    assert not (tmp_path / "none").exists()


def test_hostile_file_names_never_leave_the_target(run_dir: Path, tmp_path: Path) -> None:
    dataset = _dataset(run_dir, "escape").clone(f"t-escape-clone-{SUFFIX}")
    hostile = ["../../escape.jpg", "/tmp/abs-escape.jpg", "..", "sub/../../../up.jpg"]
    for sample, name in zip(dataset.sort_by("file_name"), hostile, strict=False):
        sample["file_name"] = name
        sample.save()
    outer = tmp_path / "outer"
    target = outer / "target"
    copied = export_dataset(dataset, target, "coco", val_fraction=0)
    assert copied.images == N_IMAGES - len(hostile) and len(copied.skipped) == len(hostile)
    assert all("not a path inside" in reason for reason in copied.skipped)
    for fmt in ("coco", "yolo", "masks"):
        summary = export_dataset(dataset, target, fmt, media="none", overwrite=True)
        assert summary.images == N_IMAGES
        assert sorted(p.name for p in outer.iterdir()) == ["target"]
        for path in _files(target):
            assert target.resolve() in path.resolve().parents
        for coco_file in (target / "annotations").glob("*.json"):
            for image in load_coco(coco_file)["images"]:
                name = image["file_name"]
                assert ".." not in name.split("/") and not name.startswith("/")
    assert not Path("/tmp/abs-escape.jpg").exists()


def test_failed_export_leaves_no_half_written_target(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import selfment_label.review.export as export

    dataset = _dataset(run_dir, "fail")
    target = tmp_path / "out"
    export_dataset(dataset, target, "masks")
    before = {p: p.read_bytes() for p in _files(target)}
    calls = []

    def failing_save(array: np.ndarray, dest: Path) -> None:
        calls.append(dest)
        if len(calls) == 3:
            raise OSError("disk full")
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(dest, format="PNG")

    monkeypatch.setattr(export, "_save_png", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_dataset(dataset, target, "masks", overwrite=True, val_fraction=0)
    assert {p: p.read_bytes() for p in _files(target)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        export_dataset(dataset, tmp_path / "new", "masks")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_exported_files_have_the_usual_mode(run_dir: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        for fmt in ("coco", "yolo", "masks"):
            target = tmp_path / fmt
            export_dataset(_dataset(run_dir, f"mode{fmt}"), target, fmt)
            assert stat.S_IMODE(target.stat().st_mode) == 0o755
            for path in _files(target):
                assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    finally:
        os.umask(old)


def test_cli_export_with_split_options(run_dir: Path, tmp_path: Path) -> None:
    from selfment_label_cli.main import app
    from typer.testing import CliRunner

    dataset = _dataset(run_dir, "cli")
    for sample in dataset.sort_by("file_name").limit(2):
        sample.tags.append("val")
        sample.save()
    target = tmp_path / "out"
    args = ["export", str(run_dir), str(target), "--name", dataset.name, "-f", "yolo"]
    result = CliRunner().invoke(app, [*args, "--split-by-tag"])
    assert result.exit_code == 0, result.output
    assert "6 train, 2 val" in result.output
    assert len(_files(target / "labels" / "val")) == 2
    yaml_text = (target / "dataset.yaml").read_text()
    assert "val: images/val" in yaml_text
    assert json.dumps("foreground") in yaml_text

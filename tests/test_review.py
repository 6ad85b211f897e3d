"""Review in FiftyOne and export, against the real embedded database (see conftest.py).

Run folders are made with the tiny random ViT on generated images: the masks are arbitrary
but real engine output, which is all the plumbing needs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from browser import CHROMIUM, Browser
from helpers import datasets_deleted_after_module, label_tiny, tiny_config, write_scenes
from PIL import Image
from selfment_label_cli.main import app
from typer.testing import CliRunner

import selfment_label.head.apply as head_apply
import selfment_label.head.train as head_train
from selfment_label.config import RunConfig, TrainConfig, mode_config
from selfment_label.features.backbone import Backbone
from selfment_label.head.checkpoint import load_checkpoint
from selfment_label.head.model import patch_targets
from selfment_label.head.train import distil
from selfment_label.review.app import launch_app
from selfment_label.review.convert import detection_to_mask, mask_to_detection
from selfment_label.review.dataset import build_dataset, dataset_name
from selfment_label.review.export import export_dataset
from selfment_label.review.model import selfment_model
from selfment_label.review.targets import reviewed_targets
from selfment_label.runfolder.coco import decode_rle, load_coco
from selfment_label.runfolder.label import label_folder

fo = pytest.importorskip("fiftyone")
F = fo.ViewField
# FiftyOne reuses any embedded database service already running on the machine, so names are
# made unique to this test session and the datasets are deleted at the end.
SUFFIX = uuid.uuid4().hex[:8]


_delete_datasets = datasets_deleted_after_module(SUFFIX)


def _run_masks(run: Path) -> dict[str, list[np.ndarray]]:
    coco = load_coco(run / "annotations.json")
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    masks: dict[str, list[np.ndarray]] = {name: [] for name in names.values()}
    for ann in coco["annotations"]:
        masks[names[ann["image_id"]]].append(decode_rle(ann["segmentation"]))
    return masks


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Backbone) -> Path:
    """An instances-mode run over 5 generated images and one broken file (skipped)."""
    root = tmp_path_factory.mktemp("review")
    write_scenes(root / "images", 5, size=None, subfolders=True)
    (root / "images" / "broken.png").write_bytes(b"not an image")
    label_tiny(root / "images", root / "run", tiny_backbone)
    return root / "run"


def test_build_dataset_keeps_scores_and_skips_broken_images(run_dir: Path) -> None:
    provenance = json.loads((run_dir / "run.json").read_text())
    dataset = build_dataset(run_dir, name=f"t-build-{SUFFIX}")
    assert len(dataset) == len(_run_masks(run_dir)) == 5
    assert "broken.png" in provenance["images_skipped"]
    assert dataset.info["selfment"]["run"]["input_dir"] == provenance["input_dir"]
    scores = {a["score"] for a in load_coco(run_dir / "annotations.json")["annotations"]}
    assert set(dataset.values("pseudo.detections.confidence", unwind=True)) == scores


def test_entities_keep_their_hierarchy(tmp_path: Path, tiny_backbone: Backbone) -> None:
    images, run = tmp_path / "images", tmp_path / "run"
    write_scenes(images, 2, size=None, subfolders=True)
    label_tiny(images, run, tiny_backbone, mode="entities")
    dataset = build_dataset(run)
    assert dataset.info["selfment"]["label_fields"] == ["entities", "parts"]
    source = load_coco(run / "annotations.json")["annotations"]
    assert dataset.count("entities.detections") == sum(a["level"] == 0 for a in source)
    assert dataset.count("parts.detections") == sum(a["level"] == 1 for a in source)


def test_rebuild_after_new_run_keeps_tags_and_edits(
    tmp_path: Path, tiny_backbone: Backbone
) -> None:
    images, run = tmp_path / "images", tmp_path / "run"
    write_scenes(images, 3, size=None, subfolders=True)
    label_tiny(images, run, tiny_backbone, mode="single")
    dataset = build_dataset(run)
    assert dataset.name == dataset_name(run)
    sample = dataset.sort_by("file_name").first()
    sample.tags.append("approved")
    sample.pseudo.detections = []
    sample.save()
    write_scenes(images, 2, start=3, size=None, subfolders=True)
    label_tiny(images, run, tiny_backbone, mode="single")
    gt = tmp_path / "gt"
    for path in images.rglob("*.png"):
        mask = np.zeros(Image.open(path).size[::-1], dtype=np.uint8)
        mask[10:40, 20:50] = 255
        (gt / path.parent.relative_to(images)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(gt / path.relative_to(images))
    dataset = build_dataset(run, gt_dir=gt)
    assert len(dataset) == 5
    again = dataset[sample.filepath]
    assert again.tags == ["approved"] and again.pseudo.detections == []
    assert dataset.count("ground_truth.detections") == 5


def test_rebuild_replaces_a_sample_whose_image_was_replaced(
    tmp_path: Path, tiny_backbone: Backbone
) -> None:
    """Issue 22, item 3: a replaced image gets the run's new size and masks; its verdict tags
    move to a field (kept, not applied to a picture nobody reviewed); other samples keep theirs."""
    from selfment_label.review.status import review_status

    images, run = tmp_path / "images", tmp_path / "run"
    write_scenes(images, 3, size=None, subfolders=True)
    label_tiny(images, run, tiny_backbone, mode="single")
    dataset = build_dataset(run, f"t-replaced-{SUFFIX}")
    first, second = dataset.sort_by("file_name").limit(2)
    first.tags.append("approved")
    first.pseudo.detections = first.pseudo.detections[:1]
    first.save()
    second.tags.append("rejected")
    second.save()
    old_size = Image.open(first.filepath).size
    Image.fromarray(np.full((old_size[0] + 20, old_size[1] + 10, 3), 200, np.uint8)).save(
        first.filepath
    )
    label_tiny(images, run, tiny_backbone, mode="single")
    dataset = build_dataset(run)
    replaced = dataset[first.filepath]
    width, height = Image.open(first.filepath).size
    assert (replaced.metadata.width, replaced.metadata.height) == (width, height)
    assert replaced.tags == [] and replaced["tags_before_image_changed"] == ["approved"]
    masks = [detection_to_mask(d, width, height) for d in replaced.pseudo.detections]
    written = _run_masks(run)[first.file_name]
    assert len(masks) == len(written)
    assert all(np.array_equal(a, b) for a, b in zip(masks, written, strict=True))
    assert dataset[second.filepath].tags == ["rejected"]
    status = review_status(run)  # the run renumbered the ids of the images after it
    assert (status.edited, status.deleted, status.added) == (0, 0, 0)
    target = tmp_path / "out"
    export_dataset(dataset, target, "masks", media="none", val_fraction=0)
    png = target / "masks" / "train" / Path(first.file_name).with_suffix(".png")
    assert Image.open(png).size == (width, height)
    again = build_dataset(run)
    assert again[first.filepath]["tags_before_image_changed"] == ["approved"]


def test_a_failed_first_build_leaves_nothing_behind(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 22, item 8: a crafted file name is refused in one sentence before anything is
    made, and a build that fails midway deletes the dataset it created."""
    import selfment_label.review.dataset as review_dataset

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    coco = load_coco(run / "annotations.json")
    name = f"t-failed-{SUFFIX}"
    crafted = {**coco, "images": [{**coco["images"][0], "file_name": "../../../../etc/os-release"}]}
    (run / "annotations.json").write_text(json.dumps(crafted))
    result = CliRunner().invoke(app, ["review", str(run), "--name", name, "--no-launch"])
    assert result.exit_code == 1 and "not a path inside" in " ".join(result.output.split())
    assert not fo.dataset_exists(name)
    (run / "annotations.json").write_text(json.dumps(coco))

    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(review_dataset, "save_review_views", broken)
    with pytest.raises(OSError, match="disk full"):
        build_dataset(run, name)
    assert not fo.dataset_exists(name)
    monkeypatch.undo()
    assert len(build_dataset(run, name)) == 5


def test_model_for_apply_model(run_dir: Path, tiny_backbone: Backbone) -> None:
    images = Path(json.loads((run_dir / "run.json").read_text())["input_dir"])
    dataset = fo.Dataset()
    dataset.add_samples([fo.Sample(filepath=str(p)) for p in sorted(images.glob("img*.png"))])
    model = selfment_model(tiny_config(segment=mode_config("instances")), backbone=tiny_backbone)
    dataset.apply_model(model, label_field="selfment", batch_size=2, progress=False)
    dataset.compute_metadata()
    for sample in dataset:
        detections = sample.selfment.detections
        assert detections and all(0.0 <= d.confidence <= 1.0 for d in detections)
        box = detections[0].bounding_box
        rows, cols = detections[0].mask.shape
        assert abs(rows - box[3] * sample.metadata.height) <= 1
        assert abs(cols - box[2] * sample.metadata.width) <= 1
    dataset.delete()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _url(port: int, dataset: fo.Dataset) -> str:
    return f"http://127.0.0.1:{port}/datasets/{dataset.name}"


def _server_processes(port: int, parent: psutil.Process | None = None) -> list[psutil.Process]:
    """The App server processes (service wrapper and server) of ``port`` under ``parent``."""
    found = []
    for proc in (parent or psutil.Process()).children(recursive=True):
        try:
            args = proc.cmdline()
        except psutil.Error:
            continue
        if any(a.endswith("main.py") for a in args) and f"--port {port}" in " ".join(args):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def app_session(run_dir: Path):
    """The App on a free port of 127.0.0.1, showing the run's dataset; closed afterwards."""
    dataset = build_dataset(run_dir, name=f"t-app-{SUFFIX}")
    port = _free_port()
    session = launch_app(dataset, port=port, address="127.0.0.1")
    yield session, port, dataset
    session.close()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed (/usr/bin/chromium)")
def test_app_screenshot_is_not_blank(app_session, tmp_path: Path) -> None:
    _, port, dataset = app_session
    with Browser() as browser:
        shot = browser.screenshot(_url(port, dataset), tmp_path / "app.png")
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert pixels.std(axis=0).max() > 20
    assert len(np.unique(pixels, axis=0)) > 50


def test_app_answers_and_closes_cleanly(app_session) -> None:
    session, port, _ = app_session
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
        assert response.status == 200
    servers = _server_processes(port)
    assert servers, "no App server process found"
    session.close()
    _, alive = psutil.wait_procs(servers, timeout=20)
    assert not alive
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_cli_review_ctrl_c_closes_the_app(run_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    command = [sys.executable, "-m", "selfment_label_cli", "review", str(run_dir)]
    process = subprocess.Popen(
        [*command, "--name", f"t-cli-{SUFFIX}", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "stderr.txt").open("w"),
        text=True,
        start_new_session=True,
    )
    try:
        url = next((x.strip() for x in process.stdout if x.startswith("http://127.0.0.1")), "")
        assert url, (tmp_path / "stderr.txt").read_text()
        assert url == f"http://127.0.0.1:{port}/datasets/t-cli-{SUFFIX}"
        servers = _server_processes(port, psutil.Process(process.pid))
        assert servers, "no App server process found"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(servers, timeout=20)
        assert not alive
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_cli_export_and_database_error(run_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    gt = tmp_path / "gt"
    first = load_coco(run_dir / "annotations.json")["images"][0]
    (gt / first["file_name"]).parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((first["height"], first["width"]), dtype=np.uint8)
    mask[5:20, 5:20] = 255
    Image.fromarray(mask).save(gt / first["file_name"])
    result = runner.invoke(
        app,
        ["review", str(run_dir), "--name", f"t-cli2-{SUFFIX}", "--no-launch", "--gt", str(gt)],
    )
    assert result.exit_code == 0, result.output
    assert "added as field ground_truth (1 of 5 samples" in " ".join(result.output.split())
    target = tmp_path / "out"
    args = ["export", str(run_dir), str(target), "--name", f"t-cli2-{SUFFIX}", "--format", "masks"]
    assert runner.invoke(app, args).exit_code == 0
    assert len(list((target / "masks").rglob("*.png"))) == 5
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    env = {
        **os.environ,
        "FIFTYONE_DATABASE_URI": "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=500",
    }
    failed = subprocess.run(
        [sys.executable, "-m", "selfment_label_cli", "review", str(run_dir), "--no-launch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1
    assert "FIFTYONE_DATABASE_URI" in failed.stderr and "error" in failed.stderr


def test_a_database_service_of_another_folder_is_refused(run_dir: Path, tmp_path: Path) -> None:
    """Issue 22, item 22: a process whose FIFTYONE_DATABASE_DIR differs from the folder of the
    database service already running (this test session's) is told so, not given that one."""
    from selfment_label.review.db import connect

    connect()  # this session holds (or attached to) the service of its own folder
    other = tmp_path / "other-db"
    inherited = {**os.environ, "FIFTYONE_DATABASE_DIR": str(other)}
    # with the port FiftyOne passes to child processes, and found by FiftyOne's process search
    found = {k: v for k, v in inherited.items() if k != "FIFTYONE_PRIVATE_DATABASE_PORT"}
    for env in (inherited, found):
        failed = subprocess.run(
            [sys.executable, "-m", "selfment_label_cli", "review", str(run_dir), "--no-launch"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        flat = "".join(failed.stderr.split())
        assert failed.returncode == 1, failed.stderr
        assert f"FIFTYONE_DATABASE_DIR={other}" in flat and fo.config.database_dir in flat


def test_review_is_recorded_and_export_uses_it(tmp_path: Path, tiny_backbone: Backbone) -> None:
    images, run = tmp_path / "images", tmp_path / "run"
    write_scenes(images, 3, size=None, subfolders=True)
    label_tiny(images, run, tiny_backbone)
    runner = CliRunner()
    target = tmp_path / "out"
    export = ["export", str(run), str(target), "--format", "masks", "--media", "none"]
    refused = runner.invoke(app, export)
    assert refused.exit_code == 1
    flat = "".join(refused.output.split())
    assert f"selfment-labelreview{run}" in flat and "--unreviewed" in flat
    assert not target.exists() and not fo.dataset_exists(dataset_name(run))

    name = f"t-mine-{SUFFIX}"
    result = runner.invoke(app, ["review", str(run), "--name", name, "--no-launch"])
    assert result.exit_code == 0, result.output
    assert "lowest score first" in result.output
    assert json.loads((run / "review.json").read_text()) == {"datasets": [name]}
    dataset = fo.load_dataset(name)
    rejected = dataset.sort_by("file_name").first()
    rejected.tags.append("rejected")
    rejected.save()
    result = runner.invoke(app, [*export, "--exclude-tags", "rejected"])
    assert result.exit_code == 0, result.output
    written = {p.relative_to(target / "masks") for p in (target / "masks").rglob("*.png")}
    assert len(written) == 2
    assert Path(rejected.file_name).with_suffix(".png") not in written
    # `review` again without --name reopens the recorded dataset, tags intact.
    again = runner.invoke(app, ["review", str(run), "--no-launch"])
    assert again.exit_code == 0 and name in again.output
    assert fo.load_dataset(name).count_sample_tags() == {"rejected": 1}

    view = dataset.load_saved_view("lowest score first")
    best = [max(d.confidence for d in s.pseudo.detections) for s in view]
    assert best == sorted(best) and len(best) == 3


def test_rebuild_after_overwrite_with_another_mode_has_no_stale_label(
    tmp_path: Path, tiny_backbone: Backbone
) -> None:
    images, run = tmp_path / "images", tmp_path / "run"
    write_scenes(images, 3, size=None, subfolders=True)
    label_tiny(images, run, tiny_backbone, mode="instances")
    name = f"t-rebuild-{SUFFIX}"
    dataset = build_dataset(run, name)
    first, second, third = dataset.sort_by("file_name")
    first.tags.append("approved")
    first.pseudo.detections = []
    first.save()
    fingerprint = dataset.info["selfment"]["runs"][str(run.resolve())]

    Path(third.filepath).unlink()
    label_folder(
        images,
        run,
        tiny_config(segment=mode_config("entities")),
        backbone=tiny_backbone,
        overwrite=True,
    )
    dataset = build_dataset(run)  # the recorded name
    assert dataset.name == name and len(dataset) == 2
    assert not dataset.has_sample_field("pseudo")
    info = dataset.info["selfment"]
    assert info["mode"] == "entities" and info["label_fields"] == ["entities", "parts"]
    assert info["run"]["options"]["mode"] == "entities"
    assert info["runs"][str(run.resolve())] != fingerprint
    source = load_coco(run / "annotations.json")["annotations"]
    assert dataset.count("entities.detections") == sum(a["level"] == 0 for a in source)
    assert dataset.count("parts.detections") == sum(a["level"] == 1 for a in source)
    assert dataset[first.filepath].tags == ["approved"]
    assert third.filepath not in dataset.values("filepath")
    target = tmp_path / "out"
    assert export_dataset(dataset, target, "coco", media="none").annotations == len(source)


def _edit_review(dataset: fo.Dataset) -> tuple[dict[str, str], np.ndarray]:
    """Reject one sample, delete every mask of another, replace the mask of a third."""
    rejected, deleted, edited, *_ = dataset.sort_by("file_name")
    rejected.tags.append("rejected")
    rejected.save()
    deleted.tags.append("approved")
    deleted.pseudo.detections = []
    deleted.save()
    width, height = edited.metadata.width, edited.metadata.height
    box = np.zeros((height, width), dtype=bool)
    box[5:40, 10:60] = True
    edited.tags.append("approved")
    edited.pseudo.detections = [mask_to_detection(box, 1.0)]
    edited.save()
    names = {"rejected": rejected.file_name, "deleted": deleted.file_name}
    names["edited"] = edited.file_name
    return names, box


def test_train_reviewed_honours_rejections_deletions_and_edits(
    tmp_path: Path, tiny_backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, run = tmp_path / "images", tmp_path / "run"
    write_scenes(images, 5, size=None, subfolders=True)
    label_tiny(images, run, tiny_backbone, mode="single")
    name = f"t-train-{SUFFIX}"
    names, box = _edit_review(build_dataset(run, name))

    source = reviewed_targets(run)
    masks = {file_name: mask for file_name, _, _, mask in source.targets}
    assert source.dataset == name and len(masks) == 4 and names["rejected"] not in masks
    assert not masks[names["deleted"]].any()
    assert np.array_equal(masks[names["edited"]], box)
    assert len(reviewed_targets(run, tags=["approved"]).targets) == 2
    # A dataset built before samples named their run: its samples are claimed by its run.
    legacy = fo.load_dataset(name)
    legacy.delete_sample_field("run_dir")
    del legacy.info["selfment"]["runs"]
    legacy.save()
    assert build_dataset(run, name).count("run_dir") == 5
    assert len(reviewed_targets(run).targets) == 4

    used: dict[str, torch.Tensor] = {}
    train_head = head_train.train_head

    def spy(images, *args, **kwargs):
        used.update({image.file_name: image.target for image in images})
        return train_head(images, *args, **kwargs)

    monkeypatch.setattr(head_train, "train_head", spy)
    config = TrainConfig(epochs=1, batch_size=2)
    distil(run, tmp_path / "warm.pt", config, backbone=tiny_backbone)  # fills the cache
    assert len(used) == 5
    used.clear()
    out = tmp_path / "head.pt"
    args = ["train", str(run), "--out", str(out), "--reviewed", "--epochs", "1", "--offline"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert set(used) == set(masks)
    assert float(used[names["deleted"]].sum()) == 0
    edited = used[names["edited"]]
    grid = tuple(edited.shape)
    assert torch.equal(edited, patch_targets(box, grid))
    review = load_checkpoint(out).meta["data"]["review"]
    assert review == {
        "dataset": name,
        "tags": [],
        "exclude_tags": ["rejected"],
        "samples": 4,
    }
    assert load_checkpoint(out).meta["data"]["images"] == 4
    used.clear()
    approved = CliRunner().invoke(app, [*args, "--overwrite", "--tags", "approved"])
    assert approved.exit_code == 0, approved.output
    assert set(used) == {names["deleted"], names["edited"]}
    assert load_checkpoint(out).meta["data"]["review"]["samples"] == 2


def test_apply_review_adds_scored_samples_and_the_saved_view(
    tmp_path: Path, tiny_backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, run = tmp_path / "images", tmp_path / "run"
    write_scenes(images, 3, size=None, subfolders=True)
    label_tiny(images, run, tiny_backbone, mode="single")
    name = f"t-apply-{SUFFIX}"
    build_dataset(run, name)
    head = tmp_path / "head.pt"
    distil(run, head, TrainConfig(epochs=1, batch_size=2), backbone=tiny_backbone)
    monkeypatch.setattr(head_apply, "backbone_for", lambda config: tiny_backbone)
    new = tmp_path / "new"
    write_scenes(new, 3, start=5, size=None, subfolders=True)
    run2 = tmp_path / "run2"
    args = ["apply", str(head), str(new), "--out", str(run2), "--review"]
    result = CliRunner().invoke(app, [*args, "--name", name])
    assert result.exit_code == 0, result.output
    assert "lowest score first" in result.output
    dataset = fo.load_dataset(name)
    added = dataset.match(F("run_dir") == str(run2.resolve()))
    assert len(dataset) == 6 and len(added) == 3
    scores = {a["score"] for a in load_coco(run2 / "annotations.json")["annotations"]}
    assert set(added.values("pseudo.detections.confidence", unwind=True)) == scores
    assert json.loads((run2 / "review.json").read_text()) == {"datasets": [name]}
    view = dataset.load_saved_view("lowest score first")
    best = [max((d.confidence for d in s.pseudo.detections), default=-1.0) for s in view]
    assert best == sorted(best) and len(best) == 6

    run3 = tmp_path / "run3"
    own = CliRunner().invoke(app, ["apply", str(head), str(new), "--out", str(run3), "--review"])
    assert own.exit_code == 0, own.output
    own_name = dataset_name(run3)
    assert json.loads((run3 / "review.json").read_text()) == {"datasets": [own_name]}
    assert len(fo.load_dataset(own_name)) == 3
    assert "lowest score first" in fo.load_dataset(own_name).list_saved_views()
    fo.delete_dataset(own_name)


# --- the reviewer's first minute: App settings, saved views, embeddings, status ------------


def test_status_counts_tags_and_mask_edits(tmp_path: Path, tiny_backbone: Backbone) -> None:
    images, run = tmp_path / "images", tmp_path / "run"
    write_scenes(images, 5, size=None, subfolders=True)
    label_tiny(images, run, tiny_backbone, mode="single")
    name = f"t-status-{SUFFIX}"
    runner = CliRunner()
    before = runner.invoke(app, ["review", str(run), "--name", name, "--status"])
    assert before.exit_code == 1 and "review the run first" in " ".join(before.output.split())
    dataset = build_dataset(run, name)
    names, _ = _edit_review(dataset)  # rejected, approved + masks deleted, approved + edited
    written = _run_masks(run)
    last = dataset.sort_by("file_name").last()
    last.tags.append("rejected")
    for detection in last.pseudo.detections:  # same mask id, other pixels
        detection.mask = ~detection.mask
    last.save()
    result = runner.invoke(app, ["review", str(run), "--status"])
    assert result.exit_code == 0, result.output
    cells = [line.split("│") for line in result.output.splitlines() if line.count("│") == 3]
    counts = {cell[1].strip(): cell[2].strip() for cell in cells}
    assert counts["tagged approved"] == "2" and counts["tagged rejected"] == "2"
    assert counts["untouched (neither tag)"] == "1"
    assert counts["masks the run wrote"] == str(sum(map(len, written.values())))
    # the edited sample's mask was replaced by a new one: its own counts as deleted
    replaced = len(written[names["deleted"]]) + len(written[names["edited"]])
    assert counts["masks deleted since the run"] == str(replaced)
    assert counts["masks edited since the run"] == str(len(written[last.file_name]))
    assert counts["masks added by the reviewer"] == "1"
    assert "'lowest score first'" in result.output and "'no mask'" in result.output


def test_embeddings_without_weights_or_cache_say_why(tmp_path: Path, tiny_backbone) -> None:
    images, run = tmp_path / "images", tmp_path / "run"
    write_scenes(images, 3, size=None, subfolders=True)
    label_tiny(images, run, tiny_backbone, mode="single")  # random weights: no file to reload
    args = ["review", str(run), "--name", f"t-noweights-{SUFFIX}", "--embeddings"]
    result = CliRunner().invoke(app, [*args, "--no-launch", "--offline"])
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "error: the feature cache" in message and "--weights" in message
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, ecssd_dir: Path, real_backbone) -> Path:
    """A real run (DINOv2 ViT-S/14, 224 px) over 12 ECSSD images, a horizontally flipped copy
    of 0003.jpg, and a flat grey image (no object); ground truth beside it in ``gt``."""
    root = tmp_path_factory.mktemp("real-review")
    images, gt = root / "images", root / "gt"
    images.mkdir()
    gt.mkdir()
    for i in range(1, 13):
        shutil.copy(ecssd_dir / "images" / f"{i:04d}.jpg", images)
        shutil.copy(ecssd_dir / "masks" / f"{i:04d}.png", gt)
    flip = Image.Transpose.FLIP_LEFT_RIGHT
    Image.open(ecssd_dir / "images" / "0003.jpg").transpose(flip).save(images / "0003f.jpg")
    Image.open(ecssd_dir / "masks" / "0003.png").transpose(flip).save(gt / "0003f.png")
    Image.new("RGB", (400, 300), (128, 128, 128)).save(images / "grey.png")
    label_folder(images, root / "run", RunConfig(resolution=224), backbone=real_backbone)
    return root / "run"


@pytest.mark.slow
def test_review_gt_embeddings_views_and_app_settings(real_run: Path) -> None:
    name = f"t-real-{SUFFIX}"
    gt = real_run.parent / "gt"
    args = ["review", str(real_run), "--name", name, "--gt", str(gt), "--embeddings"]
    result = CliRunner().invoke(app, [*args, "--no-launch", "--offline"])
    assert result.exit_code == 0, result.output
    for view in ("lowest score first", "not reviewed yet", "no mask"):
        assert f"'{view}'" in result.output
    dataset = fo.load_dataset(name)
    scheme = dataset.app_config.color_scheme
    colors = {field["path"]: field["fieldColor"] for field in scheme.fields}
    assert colors["pseudo"] != colors["ground_truth"] and 0 < scheme.opacity < 1
    groups = [group.name for group in dataset.app_config.sidebar_groups]
    assert groups[:3] == ["tags", "labels", "review"]
    assert dataset.load_saved_view("no mask").values("file_name") == ["grey.png"]
    reason = dataset.load_saved_view("no mask").first().no_mask_reason
    assert "no distinct object" in reason

    # --embeddings: brain runs on the run's real features, cached for `train` to reuse
    assert {"selfment_embeddings", "selfment_similarity"} <= set(dataset.list_brain_runs())
    assert len(list((real_run / "features").rglob("*.pt"))) == 14
    by_name = dict(zip(dataset.values("file_name"), dataset.values("id"), strict=True))
    for query, twin in (("0003.jpg", "0003f.jpg"), ("0003f.jpg", "0003.jpg")):
        nearest = dataset.sort_by_similarity(by_name[query], k=2, brain_key="selfment_similarity")
        assert nearest.values("file_name") == [query, twin]

    # a rebuild keeps the user's own saved view and colours, and still updates the rest
    dataset.save_view("my doubtful ones", dataset.match(F("score") < 0.9))
    dataset.app_config.color_scheme = fo.ColorScheme(color_pool=["#00ff00"], opacity=0.9)
    dataset.save()
    dataset = build_dataset(real_run, name)
    assert "my doubtful ones" in dataset.list_saved_views()
    assert dataset.app_config.color_scheme.opacity == 0.9
    assert dataset.info["selfment"]["app_config"]["sidebar_groups"] is not None


def _update_session(session, **state) -> None:
    """Set session attributes (``view``, ``spaces``), waiting for the session's client to
    connect to a server that is still starting."""
    deadline = time.monotonic() + 120
    while True:
        try:
            for key, value in state.items():
                setattr(session, key, value)
            return
        except RuntimeError:  # "Client is not connected" yet
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _overlay_color(shown: np.ndarray, bare: np.ndarray) -> tuple[np.ndarray, int]:
    """The colour a field's overlay is drawn in, measured from screenshots with and without
    it: where they differ, ``shown = (1 - a) * bare + a * color``; a least-squares fit per
    channel of ``shown - bare`` against ``bare`` gives ``-a`` and ``a * color``."""
    changed = np.abs(shown.astype(int) - bare.astype(int)).sum(-1) > 40
    base = bare[changed].astype(float)
    diff = shown[changed].astype(float) - base
    color = []
    for channel in range(3):
        design = np.stack([base[:, channel], np.ones(len(base))], 1)
        (slope, intercept), *_ = np.linalg.lstsq(design, diff[:, channel], rcond=None)
        color.append(intercept / max(-slope, 1e-6))
    return np.clip(color, 0, 255), int(changed.sum())


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed (/usr/bin/chromium)")
def test_app_draws_pseudo_and_gt_in_other_colours_and_shows_embeddings(
    real_run: Path, tmp_path: Path
) -> None:
    from selfment_label.review.embeddings import embeddings_space

    name = f"t-real-{SUFFIX}"
    if not fo.dataset_exists(name):
        pytest.skip("needs test_review_gt_embeddings_views_and_app_settings")
    dataset = fo.load_dataset(name)
    dataset.app_config.color_scheme = None  # the user's colours of the previous test
    dataset.save()
    dataset = build_dataset(real_run, name)
    port = _free_port()
    session = launch_app(dataset, port=port, address="127.0.0.1")
    shots = {}
    try:
        with Browser() as browser:
            for field in ("pseudo", "ground_truth", None):
                view = dataset.select_fields(field) if field else dataset.select_fields()
                _update_session(session, view=view)
                shots[field] = browser.screenshot(_url(port, dataset), tmp_path / f"{field}.png")
            _update_session(session, view=None)
            shots["both"] = browser.screenshot(_url(port, dataset), tmp_path / "review.png")
            _update_session(session, spaces=embeddings_space())
            browser.screenshot(_url(port, dataset), tmp_path / "list.png")
            browser.click_text("Dismiss", settle=1)  # the Enterprise upsell card
            browser.click_text("selfment_embeddings", settle=10)
            shots["embeddings"] = browser.save_screenshot(tmp_path / "review-embeddings.png")
    finally:
        session.close()
    pixels = {key: np.asarray(Image.open(path).convert("RGB")) for key, path in shots.items()}
    pseudo, n_pseudo = _overlay_color(pixels["pseudo"], pixels[None])
    truth, n_truth = _overlay_color(pixels["ground_truth"], pixels[None])
    print(
        f"measured overlay colours: pseudo {pseudo.round()} ({n_pseudo} px), "
        f"ground_truth {truth.round()} ({n_truth} px)"
    )
    assert n_pseudo > 10_000 and n_truth > 10_000
    assert np.linalg.norm(pseudo - truth) > 120
    # the embeddings plot: orange-brown points on the panel's grey background (right third)
    panel = pixels["embeddings"][260:840, 870:].astype(int)
    points = panel[..., 0] - panel[..., 2] > 60
    assert points.sum() > 14 * 10
    docs = os.environ.get("SELFMENT_DOCS")
    if docs:
        for key in ("both", "embeddings"):
            shutil.copy(shots[key], Path(docs) / shots[key].name)


def test_review_cli_starts_the_app_once_and_stops_it(run_dir: Path) -> None:
    """`review` without --no-launch: the App's server is up before the session connects (no
    "Could not connect session" and its 10 s wait), FiftyOne's banner is printed once (not
    again through our log handler), the URL is given, and Ctrl-C stops the server."""
    port = _free_port()
    command = [sys.executable, "-m", "selfment_label_cli", "review", str(run_dir)]
    process = subprocess.Popen(
        [*command, "--name", f"t-cli-app-{SUFFIX}", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith(f"http://127.0.0.1:{port}/datasets/"):
                break
        time.sleep(2)  # a failed first ping would be printed by now
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=120)
    output = "".join(lines) + rest
    assert process.returncode == 0, output
    assert f"http://127.0.0.1:{port}/datasets/" in output
    assert "Could not connect session" not in output
    assert output.count("App launched") == 1, output
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass

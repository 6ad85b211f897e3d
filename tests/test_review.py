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
import tempfile
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image
from selfment_label_cli.main import app
from typer.testing import CliRunner

from selfment_label.config import RunConfig, mode_config
from selfment_label.features.backbone import Backbone
from selfment_label.review.app import launch_app
from selfment_label.review.dataset import build_dataset, dataset_name
from selfment_label.review.db import ReviewError
from selfment_label.review.export import export_dataset, safe_relative_path
from selfment_label.review.model import selfment_model
from selfment_label.runfolder.coco import decode_rle, load_coco
from selfment_label.runfolder.pipeline import label_folder

fo = pytest.importorskip("fiftyone")
CHROMIUM = Path("/usr/bin/chromium")
# FiftyOne reuses any embedded database service already running on the machine, so names are
# made unique to this test session and the datasets are deleted at the end.
SUFFIX = uuid.uuid4().hex[:8]


@pytest.fixture(scope="module", autouse=True)
def _delete_datasets():
    """Delete the datasets this module made."""
    yield
    for name in fo.list_datasets():
        if name.endswith(SUFFIX) or SUFFIX in name:
            fo.delete_dataset(name)


def _make_images(folder: Path, count: int, start: int = 0) -> None:
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        sub = folder / ("sub" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        height, width = 90 + 7 * i, 120 - 5 * i
        image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        image[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3] = [220, 40, 40]
        Image.fromarray(image).save(sub / f"img{i}.png")


def _label(images: Path, out: Path, backbone: Backbone, mode: str = "instances") -> None:
    label_folder(
        images, out, RunConfig(resolution=112, segment=mode_config(mode)), backbone=backbone
    )


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
    _make_images(root / "images", 5)
    (root / "images" / "broken.png").write_bytes(b"not an image")
    _label(root / "images", root / "run", tiny_backbone)
    return root / "run"


def _all_files_inside(target: Path) -> None:
    for path in target.rglob("*"):
        assert target.resolve() in path.resolve(strict=False).parents or path.is_symlink()


def test_build_tag_delete_export(run_dir: Path, tmp_path: Path) -> None:
    provenance = json.loads((run_dir / "run.json").read_text())
    run_masks = _run_masks(run_dir)
    dataset = build_dataset(run_dir, name=f"t-export-{SUFFIX}")
    assert len(dataset) == len(run_masks) == 5
    assert "broken.png" in provenance["images_skipped"]
    assert dataset.info["selfment"]["run"]["input_dir"] == provenance["input_dir"]
    scores = {a["score"] for a in load_coco(run_dir / "annotations.json")["annotations"]}
    assert set(dataset.values("pseudo.detections.confidence", unwind=True)) == scores
    samples = list(dataset.sort_by("file_name"))
    samples[0].tags.append("rejected")
    samples[0].save()
    samples[1].tags.append("approved")
    samples[1].save()
    edited = samples[2]
    deleted = edited.pseudo.detections.pop(0)
    edited.save()
    assert deleted.mask is not None

    target = tmp_path / "coco"
    summary = export_dataset(dataset, target, "coco", exclude_tags=["rejected"])
    from pycocotools.coco import COCO

    coco = COCO(str(target / "annotations.json"))
    files = {image["file_name"]: image for image in coco.dataset["images"]}
    assert summary.images == len(files) == 4
    assert samples[0].file_name not in files
    expected = sum(len(run_masks[name]) for name in files) - 1
    assert summary.annotations == len(coco.dataset["annotations"]) == expected
    for name, image in files.items():
        assert (target / "images" / name).is_file()
        got = [coco.annToMask(a).astype(bool) for a in coco.imgToAnns[image["id"]]]
        want = run_masks[name][1:] if name == edited.file_name else run_masks[name]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert np.array_equal(g, w)
    for ann in coco.dataset["annotations"]:
        assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)

    with pytest.raises(ReviewError, match="not empty"):
        export_dataset(dataset, target, "coco")
    export_dataset(dataset, target, "coco", polygons=True, media="none", overwrite=True)
    poly = load_coco(target / "annotations.json")
    assert not (target / "images").exists()
    assert all(isinstance(a["segmentation"], list) for a in poly["annotations"])

    yolo = tmp_path / "yolo"
    summary = export_dataset(dataset, yolo, "yolo", tags=["approved"])
    assert summary.images == 1
    labels = list((yolo / "labels" / "train").glob("*.txt"))
    assert len(labels) == 1 and (yolo / "dataset.yaml").is_file()
    for line in labels[0].read_text().splitlines():
        values = line.split()
        assert values[0] == "0" and len(values) % 2 == 1 and len(values) >= 7
        assert all(0.0 <= float(v) <= 1.0 for v in values[1:])

    masks = tmp_path / "masks"
    export_dataset(dataset, masks, "masks", media="symlink")
    for name in files:
        png = np.asarray(Image.open(masks / "masks" / Path(name).with_suffix(".png")))
        want = np.any(run_masks[name][1:] if name == edited.file_name else run_masks[name], 0)
        assert np.array_equal(png == 255, want)
        assert (masks / "images" / name).is_symlink()
    _all_files_inside(target)
    _all_files_inside(yolo)


def test_rebuild_after_new_run_keeps_tags_and_edits(
    tmp_path: Path, tiny_backbone: Backbone
) -> None:
    images, run = tmp_path / "images", tmp_path / "run"
    _make_images(images, 3)
    _label(images, run, tiny_backbone, mode="single")
    dataset = build_dataset(run)
    assert dataset.name == dataset_name(run)
    sample = dataset.sort_by("file_name").first()
    sample.tags.append("approved")
    sample.pseudo.detections = []
    sample.save()
    _make_images(images, 2, start=3)
    _label(images, run, tiny_backbone, mode="single")
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


def test_entities_keep_their_hierarchy(tmp_path: Path, tiny_backbone: Backbone) -> None:
    images, run = tmp_path / "images", tmp_path / "run"
    _make_images(images, 2)
    _label(images, run, tiny_backbone, mode="entities")
    dataset = build_dataset(run)
    assert dataset.info["selfment"]["label_fields"] == ["entities", "parts"]
    source = load_coco(run / "annotations.json")["annotations"]
    assert dataset.count("entities.detections") == sum(a["level"] == 0 for a in source)
    assert dataset.count("parts.detections") == sum(a["level"] == 1 for a in source)
    export_dataset(dataset, tmp_path / "out", "coco")
    written = load_coco(tmp_path / "out" / "annotations.json")["annotations"]
    by_id = {a["id"]: a for a in written}
    assert len(written) == len(source)
    for ann in written:
        if ann["level"] == 1 and ann.get("parent_id") is not None:
            parent = by_id[ann["parent_id"]]
            assert parent["level"] == 0 and parent["image_id"] == ann["image_id"]
    assert sum("parent_id" in a for a in written) == sum("parent_id" in a for a in source)


def test_safe_relative_path() -> None:
    assert safe_relative_path("../../etc/passwd") == "etc/passwd"
    assert safe_relative_path("/abs/x.jpg") == "abs/x.jpg"
    assert safe_relative_path("a\\..\\..\\b.png") == "a/b.png"
    assert safe_relative_path("C:\\x.png") == "C_/x.png"
    assert safe_relative_path("..") == "image"


def test_export_never_leaves_target(run_dir: Path, tmp_path: Path) -> None:
    dataset = build_dataset(run_dir, name=f"t-escape-{SUFFIX}").clone(f"t-escape-evil-{SUFFIX}")
    hostile = ["../../escape.png", "/tmp/abs-escape.png", "..", "sub/../../../up.png"]
    for sample, name in zip(dataset.sort_by("file_name"), hostile, strict=False):
        sample["file_name"] = name
        sample.save()
    outer = tmp_path / "outer"
    target = outer / "target"
    for fmt in ("coco", "masks"):
        export_dataset(dataset, target, fmt, overwrite=True)
        assert sorted(p.name for p in outer.iterdir()) == ["target"]
        _all_files_inside(target)
        names = (
            [i["file_name"] for i in load_coco(target / "annotations.json")["images"]]
            if (fmt == "coco")
            else []
        )
        assert all(".." not in n.split("/") and not n.startswith("/") for n in names)
    assert not Path("/tmp/abs-escape.png").exists()
    with pytest.raises(ReviewError, match="refusing"):
        export_dataset(dataset, run_dir.parent, "coco", overwrite=True)


def test_model_for_apply_model(run_dir: Path, tiny_backbone: Backbone) -> None:
    images = Path(json.loads((run_dir / "run.json").read_text())["input_dir"])
    dataset = fo.Dataset()
    dataset.add_samples([fo.Sample(filepath=str(p)) for p in sorted(images.glob("img*.png"))])
    model = selfment_model(
        RunConfig(resolution=112, segment=mode_config("instances")), backbone=tiny_backbone
    )
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
    shot = tmp_path / "app.png"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        subprocess.run(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--screenshot={shot}",
                "--window-size=1400,900",
                "--virtual-time-budget=15000",
                f"http://127.0.0.1:{port}/datasets/{dataset.name}",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
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

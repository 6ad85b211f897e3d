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
    _make_images(images, 2)
    _label(images, run, tiny_backbone, mode="entities")
    dataset = build_dataset(run)
    assert dataset.info["selfment"]["label_fields"] == ["entities", "parts"]
    source = load_coco(run / "annotations.json")["annotations"]
    assert dataset.count("entities.detections") == sum(a["level"] == 0 for a in source)
    assert dataset.count("parts.detections") == sum(a["level"] == 1 for a in source)


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
    result = runner.invoke(
        app, ["review", str(run_dir), "--name", f"t-cli2-{SUFFIX}", "--no-launch"]
    )
    assert result.exit_code == 0, result.output
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

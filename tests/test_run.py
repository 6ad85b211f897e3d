"""The pipeline end to end: COCO output, provenance, bad input, resume, conflicts, real quality."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    assert_killed_mid_run,
    assert_resumed_only_the_missing,
    copy_ecssd,
    ecssd_stems,
    scene,
    tiny_config,
    wait_for_journal,
    write_noise,
)
from PIL import Image, ImageFilter
from pycocotools.coco import COCO

from selfment_label.config import RunConfig, SingleConfig, mode_config
from selfment_label.data.images import prepare_image
from selfment_label.device import DeviceError
from selfment_label.engine import Labeller
from selfment_label.masks import full_size_masks
from selfment_label.refine import guide_side
from selfment_label.runfolder.coco import decode_rle
from selfment_label.runfolder.journal import RunConflict, RunLock
from selfment_label.runfolder.label import NoImages, label_folder
from selfment_label.runfolder.layout import score_map_path
from selfment_label.segment.base import ImageMasks
from selfment_label.segment.single import NcutIpo
from selfment_label.timing import StageTimer

CLI = [sys.executable, "-m", "selfment_label_cli"]


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    """Good images in subfolders (same stems), plus every kind of bad file."""
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    scene(1).save(root / "a" / "same.jpg")
    scene(2).save(root / "b" / "same.jpg")
    scene(3).convert("L").save(root / "gray.png")
    scene(4).convert("P").save(root / "palette.png")
    scene(5).convert("RGBA").save(root / "alpha.png")
    scene(6).convert("CMYK").save(root / "cmyk.tif")
    scene(7, (6, 5)).save(root / "tiny.png")
    scene(8).save(root / "ünïcødé 画像.png")
    (root / "zero.jpg").write_bytes(b"")
    (root / "fake.png").write_text("not an image")
    Image.new("1", (20000, 20000)).save(root / "bomb.png")
    good = root / "trunc.jpg"
    scene(9, (300, 300)).save(good, quality=95)
    good.write_bytes(good.read_bytes()[:600])
    return root


BAD = {"zero.jpg", "fake.png", "bomb.png", "trunc.jpg"}


def test_run_writes_valid_coco_and_skips_bad_files(mixed_folder, tmp_path, tiny_backbone):
    out = tmp_path / "run"
    summary = label_folder(mixed_folder, out, tiny_config(), backbone=tiny_backbone)
    assert set(summary.skipped) == BAD
    assert all(summary.skipped[n] for n in BAD)
    coco = COCO(str(out / "annotations.json"))
    names = {img["file_name"] for img in coco.dataset["images"]}
    assert names == {
        "a/same.jpg",
        "b/same.jpg",
        "gray.png",
        "palette.png",
        "alpha.png",
        "cmyk.tif",
        "tiny.png",
        "ünïcødé 画像.png",
    }
    for img in coco.dataset["images"]:
        with Image.open(mixed_folder / img["file_name"]) as im:
            assert (img["width"], img["height"]) == im.size
    for ann in coco.dataset["annotations"]:
        assert ann["iscrowd"] == 0 and ann["category_id"] == 1
        assert isinstance(ann["segmentation"]["counts"], str)
        assert 0.0 <= ann["score"] <= 1.0
        mask = coco.annToMask(ann)
        assert mask.sum() == ann["area"]
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    run = json.loads((out / "run.json").read_text())
    assert run["images_skipped"] == summary.skipped
    assert run["backbone"]["backbone"] == "dinov2-vits14"
    assert {"backbone", "ncut", "ipo", "masks"} <= set(run["stage_seconds"])
    assert run["images_labelled"] == 8


def test_annotations_give_back_exactly_the_engine_masks(mixed_folder, tmp_path, tiny_backbone):
    out = tmp_path / "run"
    label_folder(mixed_folder, out, tiny_config(), backbone=tiny_backbone)
    coco = COCO(str(out / "annotations.json"))
    labeller = Labeller(tiny_backbone, NcutIpo())
    mean, std = tiny_backbone.mean_std
    refine = RunConfig().refine
    for img in coco.dataset["images"]:
        item = prepare_image(
            mixed_folder, img["file_name"], 112, 14, mean, std, guide_side=guide_side(refine)
        )
        patch_masks = labeller.patch_masks([item], StageTimer())[0]
        kept, _ = full_size_masks(patch_masks, item.width, item.height, refine, item.guide)
        # an image the engine finds object-less (no_object) has no mask and no annotation
        expected = kept[0].mask if kept else np.zeros((item.height, item.width), bool)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert len(anns) == len(kept), img["file_name"]
        got = coco.annToMask(anns[0]).astype(bool) if anns else np.zeros_like(expected)
        assert np.array_equal(got, expected), img["file_name"]


def test_second_run_is_idempotent_and_picks_up_new_images(mixed_folder, tmp_path, tiny_backbone):
    out = tmp_path / "run"
    config = tiny_config()
    label_folder(mixed_folder, out, config, backbone=tiny_backbone)
    first = (out / "annotations.json").read_text()
    again = label_folder(mixed_folder, out, config, backbone=tiny_backbone)
    assert again.labelled == 0 and again.resumed == 8
    assert set(again.new_skips) == BAD  # skips are retried on every resume
    assert (
        json.loads((out / "annotations.json").read_text())["annotations"]
        == json.loads(first)["annotations"]
    )
    scene(11).save(mixed_folder / "new.png")
    more = label_folder(mixed_folder, out, config, backbone=tiny_backbone)
    assert more.labelled == 1
    assert len(json.loads((out / "annotations.json").read_text())["images"]) == 9


def test_other_options_refuse_without_overwrite(mixed_folder, tmp_path, tiny_backbone):
    out = tmp_path / "run"
    label_folder(mixed_folder, out, tiny_config(), backbone=tiny_backbone)
    with pytest.raises(RunConflict, match="tau") as refused:
        label_folder(
            mixed_folder,
            out,
            tiny_config(segment=SingleConfig(tau=0.3)),
            backbone=tiny_backbone,
        )
    assert refused.value.remedy == "overwrite"
    summary = label_folder(
        mixed_folder,
        out,
        tiny_config(segment=SingleConfig(tau=0.3)),
        backbone=tiny_backbone,
        overwrite=True,
    )
    assert summary.labelled == 8
    assert json.loads((out / "run.json").read_text())["options"]["tau"] == 0.3


def test_busy_run_folder_refuses(mixed_folder, tmp_path, tiny_backbone):
    out = tmp_path / "run"
    with RunLock(out), pytest.raises(RunConflict, match="another selfment-label process") as busy:
        label_folder(mixed_folder, out, tiny_config(), backbone=tiny_backbone)
    assert busy.value.remedy == "out_dir"


def test_empty_and_missing_folders_are_errors(tmp_path, tiny_backbone):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoImages):
        label_folder(tmp_path / "empty", tmp_path / "o", backbone=tiny_backbone)
    with pytest.raises(FileNotFoundError):
        label_folder(tmp_path / "missing", tmp_path / "o", backbone=tiny_backbone)
    for folder in ("empty", "missing"):
        result = subprocess.run(
            [*CLI, "run", str(tmp_path / folder), "--out", str(tmp_path / "o")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode != 0
        assert "error" in result.stderr.lower()


def test_cli_help_and_version():
    import typer
    from selfment_label_cli.main import app
    from typer.testing import CliRunner

    version = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("selfment-label ")
    commands = sorted(typer.main.get_command(app).commands)
    assert {"run", "eval", "review", "export", "train", "apply"} <= set(commands)
    runner = CliRunner()
    for command in commands:
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, command
        assert "Usage" in result.output, command


def test_kill_nine_then_resume_finishes_only_what_is_missing(tmp_path, ecssd_dir, weights_path):
    images = copy_ecssd(ecssd_dir, tmp_path / "images", ecssd_stems(24))
    out = tmp_path / "run"
    cmd = [
        *CLI,
        "run",
        str(images),
        "--out",
        str(out),
        "--weights",
        str(weights_path),
        "--resolution",
        "224",
        "--batch-size",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_for_journal(out, 6, 180, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = assert_killed_mid_run(out, at_least=5, total=24)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    coco = assert_resumed_only_the_missing(out, done_before, total=24)
    assert len({a["image_id"] for a in coco.dataset["annotations"]}) == len(
        coco.dataset["annotations"]
    )
    ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(ids) == len(set(ids))


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def test_real_backbone_masks_match_ground_truth(tmp_path, ecssd_dir, real_backbone):
    """Mean IoU over 16 ECSSD images must reach 0.72 with IPO, and IPO must beat NCut alone.

    The bar: the published TokenCut IoU on ECSSD is 0.712 (DINO ViT-S/16). On these 16
    images the default engine measures 0.759 with IPO and 0.733 without (0.807 / 0.744 on all
    200), so 0.72 leaves room for numeric noise across machines while failing on any real
    regression (a broken cut, a lost border swap or a flipped split costs far more).
    """
    stems = [f"{i:04d}" for i in range(1, 200, 12)][:16]
    images = copy_ecssd(ecssd_dir, tmp_path / "images", stems)
    ious = {}
    for iters in (0, 20):
        out = tmp_path / f"run{iters}"
        label_folder(
            images, out, RunConfig(segment=SingleConfig(ipo_iters=iters)), backbone=real_backbone
        )
        data = json.loads((out / "annotations.json").read_text())
        by_image = {a["image_id"]: a for a in data["annotations"]}
        scores = []
        for img in data["images"]:
            gt = (
                np.asarray(
                    Image.open(ecssd_dir / "masks" / f"{Path(img['file_name']).stem}.png").convert(
                        "L"
                    )
                )
                > 127
            )
            ann = by_image.get(img["id"])
            pred = decode_rle(ann["segmentation"]) if ann else np.zeros_like(gt)
            scores.append(_iou(pred, gt))
        ious[iters] = float(np.mean(scores))
    assert ious[20] >= 0.72, ious
    assert ious[20] > ious[0], ious


def test_exif_rotated_image_gets_the_mask_of_the_displayed_image(
    tmp_path, ecssd_dir, real_backbone
):
    upright = Image.open(ecssd_dir / "images" / "0005.jpg").convert("RGB")
    folder = tmp_path / "images"
    folder.mkdir()
    upright.save(folder / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.jpg", exif=exif, quality=97)
    out = tmp_path / "run"
    label_folder(folder, out, RunConfig(), backbone=real_backbone)
    coco = COCO(str(out / "annotations.json"))
    masks = {}
    for img in coco.dataset["images"]:
        assert (img["width"], img["height"]) == upright.size
        (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        masks[img["file_name"]] = coco.annToMask(ann).astype(bool)
    assert _iou(masks["rotated.jpg"], masks["upright.png"]) > 0.9


def test_batched_and_single_image_runs_agree(tmp_path, ecssd_dir, real_backbone):
    images = copy_ecssd(ecssd_dir, tmp_path / "images", ["0010", "0011", "0012", "0013"])
    results = []
    for batch in (1, 4):
        out = tmp_path / f"b{batch}"
        label_folder(images, out, RunConfig(batch_size=batch), backbone=real_backbone)
        results.append(json.loads((out / "annotations.json").read_text())["annotations"])
    a, b = results
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert _iou(decode_rle(x["segmentation"]), decode_rle(y["segmentation"])) > 0.98


def test_cuda_device_request_without_cuda_is_a_clear_error(mixed_folder, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="no CUDA device"):
        label_folder(mixed_folder, tmp_path / "o", RunConfig(device="cuda"))


@pytest.mark.slow
def test_every_image_gets_the_same_rle_whatever_its_batch(tmp_path, ecssd_dir, real_backbone):
    # the solver's start is one seeded block for every image and each image leaves the
    # iteration at its own convergence, so a batch's other images change nothing
    stems = ["0010", "0011", "0012", "0013", "0016", "0017", "0018", "0019"]
    images = copy_ecssd(ecssd_dir, tmp_path / "images", stems)
    results = []
    for batch in (1, 3, 8):
        out = tmp_path / f"b{batch}"
        label_folder(images, out, RunConfig(batch_size=batch), backbone=real_backbone)
        coco = json.loads((out / "annotations.json").read_text())
        names = {image["id"]: image["file_name"] for image in coco["images"]}
        results.append(
            {
                (names[a["image_id"]], a["segmentation"]["counts"], a["score"])
                for a in coco["annotations"]
            }
        )
    assert len(results[0]) == len(stems)
    assert results[0] == results[1] == results[2]


def test_segmenter_notes_reach_the_journal_coco_and_run_json(tmp_path, tiny_backbone):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(folder / name)

    class Noting(NcutIpo):
        def __call__(self, tokens, timer, class_tokens=None):
            found = super().__call__(tokens, timer, class_tokens)
            return [ImageMasks(masks, {"eigensolver": "capped"}) for masks in found]

    out = tmp_path / "run"
    summary = label_folder(folder, out, tiny_config(), backbone=tiny_backbone, segmenter=Noting())
    assert summary.notes == {"a.png": {"eigensolver": "capped"}, "b.png": {"eigensolver": "capped"}}
    run = json.loads((out / "run.json").read_text())
    assert run["image_notes"] == summary.notes
    coco = json.loads((out / "annotations.json").read_text())
    assert all(image["notes"] == {"eigensolver": "capped"} for image in coco["images"])


@pytest.mark.parametrize("where", ["default", "inside"])
def test_run_folder_inside_the_input_is_not_labelled(tmp_path, tiny_backbone, monkeypatch, where):
    images = write_noise(tmp_path / "img", 2, seed=1)
    monkeypatch.chdir(images)
    out = None if where == "default" else images / "labels"
    config = tiny_config(save_scores=True)
    for _ in range(2):
        summary = label_folder(images, out, config, backbone=tiny_backbone)
        assert summary.total == 2
    out_dir = summary.out_dir
    assert out_dir.parent == images
    coco = json.loads((out_dir / "annotations.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == ["0.png", "1.png"]
    assert sorted(p.name for p in (out_dir / "scores").iterdir()) == ["0.png.png", "1.png.png"]


def test_other_run_folders_inside_the_input_are_not_labelled(tmp_path, tiny_backbone):
    images = write_noise(tmp_path / "img", 2, seed=1)
    config = tiny_config(save_scores=True)
    label_folder(images, images / "old-run", config, backbone=tiny_backbone)
    summary = label_folder(images, tmp_path / "new-run", config, backbone=tiny_backbone)
    assert summary.total == 2


def test_a_run_folder_belongs_to_one_input(tmp_path, tiny_backbone):
    """Issue 22, item 2: another input into an existing run folder is refused, not resumed."""
    first, other = write_noise(tmp_path / "img", 2, seed=1), write_noise(tmp_path / "ab", 2, seed=1)
    out = tmp_path / "run"
    config = tiny_config()
    label_folder(first, out, config, backbone=tiny_backbone)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(RunConflict) as refused:
        label_folder(other, out, config, backbone=tiny_backbone)
    assert str(first) in str(refused.value) and str(other) in str(refused.value)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    label_folder(other, out, config, backbone=tiny_backbone, overwrite=True)
    assert json.loads((out / "run.json").read_text())["input_dir"] == str(other)
    # a journal whose header does not name its input (older runs): run.json's is compared
    journal = (out / "journal.jsonl").read_text().splitlines()
    header = json.loads(journal[0])
    del header["input"]
    (out / "journal.jsonl").write_text("\n".join([json.dumps(header), *journal[1:]]) + "\n")
    with pytest.raises(RunConflict, match="holds the run of"):
        label_folder(first, out, config, backbone=tiny_backbone)


def test_out_equal_to_input_is_refused(tmp_path, tiny_backbone):
    images = write_noise(tmp_path / "img", 2, seed=1)
    with pytest.raises(RunConflict, match="input folder itself") as refused:
        label_folder(images, images, tiny_config(), backbone=tiny_backbone)
    assert refused.value.remedy == "out_dir"


def test_changed_image_is_labelled_again_and_replaces_its_record(tmp_path, tiny_backbone):
    images = write_noise(tmp_path / "img", 2, seed=1)
    out = tmp_path / "run"
    config = tiny_config()
    label_folder(images, out, config, backbone=tiny_backbone)
    Image.new("RGB", (90, 40), "white").save(images / "1.png")
    os.utime(images / "1.png", ns=(1, 1))
    again = label_folder(images, out, config, backbone=tiny_backbone)
    assert again.labelled == 1 and again.resumed == 1
    coco = json.loads((out / "annotations.json").read_text())
    sizes = {i["file_name"]: (i["width"], i["height"]) for i in coco["images"]}
    assert sizes == {"0.png": (70, 50), "1.png": (90, 40)}
    assert all("key" not in i for i in coco["images"])


def test_skipped_images_are_retried_when_options_change(tmp_path, tiny_backbone):
    images = write_noise(tmp_path / "img", 2, seed=1)
    out = tmp_path / "run"
    first = label_folder(images, out, tiny_config(max_pixels=100), backbone=tiny_backbone)
    assert first.labelled == 0 and len(first.skipped) == 2
    second = label_folder(images, out, tiny_config(), backbone=tiny_backbone)
    assert second.labelled == 2 and not second.skipped
    assert len(json.loads((out / "annotations.json").read_text())["images"]) == 2


def test_corrupt_middle_journal_line_keeps_the_records_after_it(tmp_path, tiny_backbone, caplog):
    images = write_noise(tmp_path / "img", 2, seed=1)
    scene(3).save(images / "2.png")
    out = tmp_path / "run"
    config = tiny_config()
    label_folder(images, out, config, backbone=tiny_backbone)
    journal = out / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) == 4
    lines[1] = b'{"kind": "image", "file_na\n'
    journal.write_bytes(b"".join(lines) + b'{"kind": "ima')
    with caplog.at_level("WARNING"):
        again = label_folder(images, out, config, backbone=tiny_backbone)
    assert again.resumed == 2 and again.labelled == 1
    assert any("line 2 is corrupt" in r.getMessage() for r in caplog.records)
    assert any("torn last line" in r.getMessage() for r in caplog.records)
    assert len(json.loads((out / "annotations.json").read_text())["images"]) == 3
    # the corrupt line is reported once: the journal was rewritten without it
    caplog.clear()
    with caplog.at_level("WARNING"):
        third = label_folder(images, out, config, backbone=tiny_backbone)
    assert third.resumed == 3 and third.labelled == 0 and not caplog.records
    assert all(json.loads(line) for line in journal.read_bytes().splitlines())


def test_damaged_journal_header_is_one_sentence(tmp_path, tiny_backbone):
    images = write_noise(tmp_path / "img", 2, seed=1)
    out = tmp_path / "run"
    config = tiny_config()
    label_folder(images, out, config, backbone=tiny_backbone)
    journal = out / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    for fingerprint in (["not", "an", "object"], "text", None):
        header = {"kind": "header", "fingerprint": fingerprint}
        journal.write_bytes(json.dumps(header).encode() + b"\n" + b"".join(lines[1:]))
        with pytest.raises(RunConflict, match="is damaged: its first line does not record"):
            label_folder(images, out, config, backbone=tiny_backbone)


def test_a_file_name_of_255_bytes_gets_a_score_map(tmp_path, tiny_backbone):
    images = tmp_path / "img"
    images.mkdir()
    longest = {"a" * 251 + ".png", "é" * 125 + ".png", "b" * 190 + ".png"}
    for seed, name in enumerate(sorted(longest)):
        assert len(os.fsencode(name)) <= 255
        scene(seed).save(images / name)
    out = tmp_path / "run"
    config = tiny_config(save_scores=True)
    summary = label_folder(images, out, config, backbone=tiny_backbone)
    assert summary.labelled == 3 and not summary.skipped
    coco = json.loads((out / "annotations.json").read_text())
    maps = {image["file_name"]: image["score_map"] for image in coco["images"]}
    assert maps["b" * 190 + ".png"] == "scores/" + "b" * 190 + ".png.png"
    assert len(set(maps.values())) == 3
    for path in maps.values():
        assert (out / path).is_file() and len(os.fsencode(Path(path).name)) <= 255
    again = label_folder(images, out, config, backbone=tiny_backbone)
    assert again.resumed == 3 and again.labelled == 0


@pytest.mark.parametrize("key", ["a/../../x.jpg", "../x.jpg", "a//b.jpg", "./x.jpg", "a_.._x.jpg"])
def test_score_maps_stay_inside_scores_whatever_the_object_key(key):
    path = score_map_path(key)
    assert path.startswith("scores/") and ".." not in path.split("/")
    assert "" not in path.split("/") and "." not in path.split("/")
    assert path != score_map_path(key.replace("/", "_")) or "/" not in key


def _object_less_images(folder: Path) -> set[str]:
    """Synthetic images with no distinct object, of several kinds and sizes; their names."""
    rng = np.random.default_rng(0)
    made = {}
    for width, height in ((640, 480), (224, 224)):
        size = f"{width}x{height}"
        made[f"grey_{size}.png"] = np.full((height, width, 3), 128, np.uint8)
        ramp = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
        made[f"ramp_{size}.png"] = np.broadcast_to(ramp, (height, width, 3)).copy()
        made[f"noise_{size}.png"] = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for square in (8, 32, 64):
            checks = ((np.indices((height, width)) // square).sum(0) % 2 * 255).astype(np.uint8)
            made[f"checker{square}_{size}.png"] = np.stack([checks] * 3, -1)
        texture = Image.fromarray(made[f"noise_{size}.png"]).filter(ImageFilter.GaussianBlur(6))
        made[f"blurred_{size}.png"] = np.asarray(texture)
    for name, pixels in made.items():
        Image.fromarray(pixels).save(folder / name)
    return set(made)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["single", "instances"])
@pytest.mark.parametrize("resolution", [448, 224])
def test_object_less_images_get_no_mask_and_a_reason(
    tmp_path, ecssd_dir, real_backbone, mode, resolution
):
    folder = copy_ecssd(ecssd_dir, tmp_path / "images", ["0010", "0011"])
    empty = _object_less_images(folder)
    out = tmp_path / "run"
    config = RunConfig(resolution=resolution, segment=mode_config(mode))
    summary = label_folder(folder, out, config, backbone=real_backbone)
    assert set(summary.notes) == empty
    assert all("no distinct object" in n["no_object"] for n in summary.notes.values())
    coco = json.loads((out / "annotations.json").read_text())
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    annotated = {names[a["image_id"]] for a in coco["annotations"]}
    assert annotated == {"0010.jpg", "0011.jpg"}
    assert set(names.values()) == empty | annotated  # labelled, not skipped
    assert set(json.loads((out / "run.json").read_text())["image_notes"]) == empty


def test_solid_images_stay_object_less_at_a_low_resolution(tmp_path, real_backbone):
    """At 112 px a solid image's split can have clear side evidence (0.65-0.75, the class
    token's noise on near-copies of one patch): it is still alike, not a mask."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in {"grey.png": (128, 128, 128), "blue.png": (30, 90, 200)}.items():
        Image.new("RGB", (200, 150), colour).save(folder / name)
    config = RunConfig(resolution=112)
    summary = label_folder(folder, tmp_path / "run", config, backbone=real_backbone)
    assert set(summary.notes) == {"grey.png", "blue.png"}
    assert json.loads((tmp_path / "run" / "annotations.json").read_text())["annotations"] == []


def test_the_backbone_runs_one_batch_ahead_of_the_masks(tmp_path, tiny_backbone, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(3):
        scene(seed).save(folder / f"{seed}.png")
    asked: list[str] = []
    ahead: list[bool] = []
    tokens, label = Labeller.tokens, Labeller.label

    def counting_tokens(self, batch, timer):
        asked.append(batch[0].file_name)
        return tokens(self, batch, timer)

    def waiting_label(self, batch, timer, save_scores=False, batch_tokens=None):
        # the next batch's backbone must be under way before this batch's masks are made
        wanted = min(len(ahead) + 2, 3)
        deadline = time.monotonic() + 5.0
        while len(asked) < wanted and time.monotonic() < deadline:
            time.sleep(0.01)
        ahead.append(len(asked) >= wanted)
        return label(self, batch, timer, save_scores, batch_tokens)

    monkeypatch.setattr(Labeller, "tokens", counting_tokens)
    monkeypatch.setattr(Labeller, "label", waiting_label)
    summary = label_folder(
        folder, tmp_path / "run", RunConfig(batch_size=1), backbone=tiny_backbone
    )
    assert summary.labelled == 3
    assert ahead == [True, True, True]
    assert sorted(asked) == ["0.png", "1.png", "2.png"]

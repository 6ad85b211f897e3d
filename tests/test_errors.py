"""Errors a user can meet get a sentence, not a traceback: weights, RLEs, full disks."""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config, write_noise
from pycocotools import mask as mask_utils
from safetensors.torch import save_file
from selfment_label_cli.main import app
from typer.testing import CliRunner

from selfment_label.config import TrainConfig
from selfment_label.features.backbone import build_backbone
from selfment_label.features.presets import BackboneError
from selfment_label.head import features as head_features
from selfment_label.head.train import distil
from selfment_label.review.export import ExportError, check_target
from selfment_label.runfolder import journal as journal_module
from selfment_label.runfolder import label as labelling
from selfment_label.runfolder.coco import RleError, decode_rle
from selfment_label.runfolder.label import label_folder
from selfment_label.runfolder.layout import RunFolderError, union_mask


def _rle(height: int = 10, width: int = 12) -> dict:
    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    mask[2:5, 3:8] = 1
    rle = mask_utils.encode(mask)
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def test_valid_rle_decodes_and_truncated_counts_are_refused():
    rle = _rle()
    assert decode_rle(rle).sum() == 15
    assert decode_rle({"size": [2, 2], "counts": [1, 2, 1]}).sum() == 2
    with pytest.raises(RleError, match="do not cover"):
        decode_rle({**rle, "counts": rle["counts"][:2]})
    with pytest.raises(RleError, match="do not cover"):
        decode_rle({"size": [20, 12], "counts": rle["counts"]})
    with pytest.raises(RleError, match="do not cover"):
        decode_rle({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(RleError, match="malformed"):
        decode_rle({"counts": rle["counts"]})


def test_rle_of_another_size_than_its_image_is_a_sentence():
    with pytest.raises(RleError, match="12x10 but its image is 12x11"):
        decode_rle(_rle(), (11, 12))
    with pytest.raises(RunFolderError, match="annotation 7 of a.jpg: RLE mask is 12x10"):
        union_mask(12, 11, [{"id": 7, "segmentation": _rle()}], "a.jpg")


def test_weights_folder_is_named_a_folder(tmp_path: Path):
    with pytest.raises(BackboneError, match="is a folder"):
        build_backbone("dinov2-vits14", weights=tmp_path)


class Payload:
    """Something a pickle-only checkpoint could hold."""


@pytest.mark.parametrize("kind", ["truncated-safetensors", "truncated-pth", "pickle-pth"])
def test_unreadable_weights_are_a_backbone_error(tmp_path: Path, kind: str):
    tensors = {"patch_embed.proj.weight": torch.zeros(8, 3, 14, 14)}
    if kind == "truncated-safetensors":
        path = tmp_path / "w.safetensors"
        save_file(tensors, str(path))
    else:
        path = tmp_path / "w.pth"
        payload = {"model": Payload()} if kind == "pickle-pth" else tensors
        torch.save(payload, path, pickle_module=pickle)
    if kind.startswith("truncated"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BackboneError, match="cannot read the weights file"):
        build_backbone("dinov2-vits14", weights=path)


def test_weights_of_another_model_name_the_preset_they_look_like(tmp_path: Path):
    import timm

    small = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "dino_vits16.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path))
    with pytest.raises(BackboneError) as caught:
        build_backbone("dinov2-vits14", weights=path)
    message = str(caught.value)
    assert "patch 16, dim 384, 12 blocks" in message
    assert "dino-vits16" in message and "Traceback" not in message
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(BackboneError, match="does not hold ViT weights of dinov2-vits14"):
        build_backbone("dinov2-vits14", weights=foreign)


def test_commands_without_backbone_option_ask_for_the_right_weights(
    tiny_run: Path, images: Path, tmp_path: Path, tiny_backbone
):
    """``apply`` and ``train`` have no --backbone (the head or the run fixes the preset): a
    weights file of another model asks for the preset's weights instead of suggesting it."""
    import timm

    small = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    foreign = tmp_path / "dino_vits16.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(foreign))
    head = distil(tiny_run, tmp_path / "head.pt", TrainConfig(epochs=1), backbone=tiny_backbone)
    for command in (
        ["apply", str(head.checkpoint), str(images), "--out", str(tmp_path / "o")],
        [
            "train",
            str(tiny_run),
            "--out",
            str(tmp_path / "again.pt"),
            "--cache",
            str(tmp_path / "cache"),
        ],
    ):
        result = CliRunner().invoke(app, [*command, "--weights", str(foreign)])
        assert result.exit_code == 1, result.output
        text = _text(result)
        assert "holds weights of another model (patch 16, dim 384, 12 blocks)" in text
        assert (
            "needs the weights of dinov2-vits14; pass a local weights file with --weights" in text
        )
        assert "--backbone" not in text


def _text(result) -> str:
    """The CLI's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return write_noise(tmp_path / "img", 3)


@pytest.mark.parametrize(
    ("code", "sentence"),
    [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission")],
)
def test_full_or_read_only_disk_is_a_sentence_and_nothing_is_lost(
    images, tmp_path, tiny_backbone, monkeypatch, code, sentence
):
    monkeypatch.setattr(labelling, "backbone_for", lambda config: tiny_backbone)
    real_append = journal_module.Journal._append
    calls = []

    def failing_append(self, entry):
        calls.append(entry)
        if len(calls) == 3:  # header and first image written, then the disk fails
            raise OSError(code, "simulated", str(self.path))
        return real_append(self, entry)

    monkeypatch.setattr(journal_module.Journal, "_append", failing_append)
    out = tmp_path / "o"
    args = ["run", str(images), "--out", str(out), "--resolution", "112", "--batch-size", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert sentence in _text(result) and "Traceback" not in result.output
    monkeypatch.setattr(journal_module.Journal, "_append", real_append)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "already done (resumed)" in again.output


def test_train_and_eval_check_their_output_before_working(tmp_path: Path):
    run_dir = tmp_path / "not-a-run"
    run_dir.mkdir()
    folder_out = tmp_path / "a-folder"
    folder_out.mkdir()
    result = CliRunner().invoke(
        app, ["train", str(run_dir), "--out", str(folder_out), "--overwrite"]
    )
    assert result.exit_code == 1 and "is a folder" in _text(result)
    result = CliRunner().invoke(
        app, ["eval", str(run_dir), "--gt", str(tmp_path), "--per-image", str(folder_out)]
    )
    assert result.exit_code == 1 and "is a folder" in _text(result)


# --- one guard for every path the tool writes (issue 22, items 4 and 10) ---------------------


@pytest.fixture
def tiny_run(images: Path, tmp_path: Path, tiny_backbone) -> Path:
    """A run folder of the three images, labelled by the tiny backbone."""
    run_dir = tmp_path / "run"
    label_folder(images, run_dir, tiny_config(), backbone=tiny_backbone)
    return run_dir


@pytest.fixture
def no_model(monkeypatch):
    """Fail any test that gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(labelling, "backbone_for", refuse)
    monkeypatch.setattr(head_features, "build_backbone", refuse)


def test_train_never_writes_over_an_input_image_or_a_run_file(tiny_run, images, no_model):
    before = {p: p.read_bytes() for p in [*images.iterdir(), *tiny_run.iterdir()] if p.is_file()}
    for out, reason in (
        (tiny_run / "annotations.json", "belongs to the run folder"),
        (tiny_run / "journal.jsonl", "belongs to the run folder"),
        (images / "1.png", "lies inside or holds the run's input folder"),
        (images / "new" / "head.pt", "lies inside or holds the run's input folder"),
    ):
        for overwrite in ([], ["--overwrite"]):
            args = ["train", str(tiny_run), "--out", str(out), *overwrite]
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 1, result.output
            assert reason in _text(result) and "Traceback" not in result.output
    cache = CliRunner().invoke(app, ["train", str(tiny_run), "--cache", str(images / "c")])
    assert cache.exit_code == 1 and "the feature cache" in _text(cache)
    after = {p: p.read_bytes() for p in [*images.iterdir(), *tiny_run.iterdir()] if p.is_file()}
    assert after == before and not (images / "new").exists()


def test_eval_per_image_is_guarded_like_every_writer(tiny_run, images, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder")
    for target, reason in (
        (afile / "x.csv", f"{afile} is a file, not a folder"),
        (images / "scores.csv", "lies inside or holds the run's input folder"),
        (tiny_run / "run.json", "belongs to the run folder"),
    ):
        args = ["eval", str(tiny_run), "--gt", str(images), "--per-image", str(target)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output
        assert reason in _text(result) and "Traceback" not in result.output
    assert json.loads((tiny_run / "run.json").read_text())["tool"] == "selfment-label"


def test_run_and_apply_check_their_out_before_the_model_loads(images, tmp_path, no_model):
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder")
    for out, reason in ((afile, "is a file, not a folder"), (afile / "sub", "is a file")):
        for command in (["run", str(images)], ["apply", str(tmp_path / "head.pt"), str(images)]):
            result = CliRunner().invoke(app, [*command, "--out", str(out)])
            assert result.exit_code == 1, result.output
            assert reason in _text(result) and "unexpected" not in result.output
    assert afile.read_text() == "a file, not a folder"


def test_export_target_below_a_file_is_a_sentence(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        check_target(afile / "sub", overwrite=True, protected={})
    with pytest.raises(ExportError, match="the file system root"):
        check_target(Path("/"), overwrite=True, protected={})

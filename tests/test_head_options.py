"""The single head's options on real images: several blocks' tokens, test-time flip,
self-correction rounds, and the Selfment loop in one call (``selftrain``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import copy_ecssd, tiny_config
from PIL import Image
from selfment_label_cli.main import app
from typer.testing import CliRunner

from selfment_label.config import TrainConfig
from selfment_label.data.images import prepare_image
from selfment_label.features.backbone import Backbone
from selfment_label.head.apply import HeadSegmenter, apply_head, head_segmenter
from selfment_label.head.checkpoint import (
    HeadCheckpoint,
    HeadError,
    HeadMismatch,
    load_checkpoint,
    save_checkpoint,
)
from selfment_label.head.instance_model import InstanceHead
from selfment_label.head.train import distil
from selfment_label.runfolder.label import label_folder
from selfment_label.runfolder.layout import read_run
from selfment_label.selftrain import SelfTrainError, self_train_folder
from selfment_label.timing import StageTimer

pytestmark = pytest.mark.slow

SMALL = tiny_config(workers=1, refine="none", save_scores=True)
LAYERS = (8, 11)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, ecssd_dir: Path, real_backbone: Backbone):
    """A 112 px NCut+IPO run of 4 ECSSD images."""
    root = tmp_path_factory.mktemp("head-options")
    images = copy_ecssd(ecssd_dir, root / "images", [f"{i:04d}" for i in range(1, 5)])
    label_folder(images, root / "run", SMALL, backbone=real_backbone)
    return root


@pytest.fixture(scope="module")
def layered_head(real_run: Path, real_backbone: Backbone) -> Path:
    """A head on blocks 8 and 11, with one self-correction round."""
    config = TrainConfig(epochs=2, batch_size=2, layers=LAYERS, rounds=1, keep_score=0.0)
    return distil(
        real_run / "run", real_run / "layered.pt", config, backbone=real_backbone
    ).checkpoint


def test_layer_tokens_are_normed_blocks_side_by_side(
    ecssd_dir: Path, real_backbone: Backbone
) -> None:
    item = prepare_image(ecssd_dir / "images", "0001.jpg", 112, 14, *real_backbone.mean_std)
    pixels = torch.from_numpy(item.pixels)[None]
    last = real_backbone.patch_tokens(pixels)
    both = real_backbone.patch_tokens(pixels, layers=LAYERS)
    assert both.shape[:-1] == last.shape[:-1] and both.shape[-1] == 2 * last.shape[-1]
    torch.testing.assert_close(both[..., last.shape[-1] :], last)
    assert not torch.allclose(both[..., : last.shape[-1]], last)
    for bad in ((12,), (11, 11), ()):
        with pytest.raises(ValueError, match="layers"):
            real_backbone.patch_tokens(pixels, layers=bad)


def test_checkpoint_records_layers_and_rounds_and_the_cache_keeps_them_apart(
    real_run: Path, layered_head: Path
) -> None:
    meta = load_checkpoint(layered_head).meta
    assert meta["layers"] == list(LAYERS) and meta["feature_dim"] == 384 * len(LAYERS)
    assert [r["round"] for r in meta["rounds"]] == [0, 1]
    # keep_score 0: round 1 replaced every target its teacher matched
    assert meta["rounds"][0]["replaced"] == 0 and meta["rounds"][1]["replaced"] >= 1
    assert meta["final_losses"] == meta["rounds"][-1]["losses"]
    caches = list((real_run / "run" / "features").iterdir())
    assert len(caches) == 1  # one settings folder, of the layered features
    entry = next(caches[0].rglob("*.pt"))
    assert torch.load(entry, weights_only=True)["settings"]["layers"] == list(LAYERS)


def test_flip_averages_the_mirror_images_logits(
    real_run: Path, layered_head: Path, ecssd_dir: Path, real_backbone: Backbone
) -> None:
    """With flip, a mirrored image gets the mirror of the image's mask (exactly: the two
    views are the same pair); without, it does not."""
    loaded = load_checkpoint(layered_head)
    item = prepare_image(ecssd_dir / "images", "0002.jpg", 112, 14, *real_backbone.mean_std)
    pixels = torch.from_numpy(item.pixels)[None]
    mirrored = pixels.flip(-1)

    def scores(segmenter: HeadSegmenter, batch: torch.Tensor) -> torch.Tensor:
        tokens = segmenter.tokens(real_backbone, batch, None)
        return segmenter(tokens, StageTimer())[0][0].scores

    flip = HeadSegmenter(loaded.head, loaded.sha256, loaded.layers, flip=True)
    plain = HeadSegmenter(loaded.head, loaded.sha256, loaded.layers)
    torch.testing.assert_close(scores(flip, mirrored), scores(flip, pixels).flip(-1))
    assert not torch.allclose(scores(plain, mirrored), scores(plain, pixels).flip(-1))
    average = (scores(plain, pixels).logit() + scores(plain, mirrored).flip(-1).logit()) / 2
    torch.testing.assert_close(scores(flip, pixels), torch.sigmoid(average))
    assert flip.options()["flip"] is True and "flip" not in plain.options()


def test_apply_with_flip_and_layers_writes_a_run(
    real_run: Path, layered_head: Path, real_backbone: Backbone
) -> None:
    out = real_run / "applied-flip"
    summary = apply_head(
        layered_head, real_run / "images", out, SMALL, backbone=real_backbone, flip=True
    )
    assert summary.labelled == 4 and summary.annotations >= 3
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["options"]["flip"] is True and recorded["head"]["layers"] == list(LAYERS)


def test_a_head_saved_before_layers_still_loads_and_applies(
    real_run: Path, real_backbone: Backbone, tmp_path: Path
) -> None:
    trained = distil(
        real_run / "run", tmp_path / "new.pt", TrainConfig(epochs=1), backbone=real_backbone
    )
    loaded = load_checkpoint(trained.checkpoint)
    old_meta = {k: v for k, v in loaded.meta.items() if k not in ("layers", "rounds")}
    old_meta["training"] = {
        k: v
        for k, v in old_meta["training"].items()
        if k not in ("layers", "rounds", "keep_score", "drop_score", "match_iou")
    }
    old = tmp_path / "old.pt"
    save_checkpoint(old, loaded.head, old_meta)
    assert load_checkpoint(old).layers is None
    summary = apply_head(
        old, real_run / "images", tmp_path / "old-run", SMALL, backbone=real_backbone
    )
    assert summary.labelled == 4


def test_a_head_on_blocks_the_backbone_lacks_is_refused(
    layered_head: Path, real_backbone: Backbone, tmp_path: Path
) -> None:
    loaded = load_checkpoint(layered_head)
    meta = {**loaded.meta, "layers": [8, 40]}
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, loaded.head, meta)
    with pytest.raises(HeadMismatch, match=r"layers \[40\]"):
        load_checkpoint(bad).check_backbone(real_backbone)


def test_self_train_refuses_a_small_folder_before_any_work(
    real_run: Path, real_backbone: Backbone, tmp_path: Path
) -> None:
    out = tmp_path / "self"
    with pytest.raises(SelfTrainError, match="has 4 images: self-training needs at least"):
        self_train_folder(real_run / "images", out, SMALL, backbone=real_backbone)
    assert not out.exists() or not any(out.iterdir())


def _scores(run_dir: Path) -> dict[str, list[float]]:
    """Each image's annotation scores in a run."""
    return {
        image["file_name"]: [ann["score"] for ann in anns]
        for image, anns in read_run(run_dir).images()
    }


def test_self_train_labels_each_half_with_the_other_halfs_head(
    ecssd_dir: Path, real_backbone: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("selfment_label.selftrain.MIN_IMAGES", 2)
    images = copy_ecssd(ecssd_dir, tmp_path / "images", [f"{i:04d}" for i in range(5, 9)])
    out = tmp_path / "self"
    train = TrainConfig(epochs=2, batch_size=2)
    first = self_train_folder(images, out, SMALL, train, backbone=real_backbone)
    assert first.heads_trained == [True, True] and first.final.labelled == 4
    assert read_run(out / "stage1").coco["annotations"]
    recorded = json.loads((out / "run.json").read_text())["self_train"]
    assert recorded["stage1"]["run_dir"] == "stage1"
    names = sorted(_scores(out / "stage1"))
    assert recorded["folds"]["images"] == [names[0::2], names[1::2]]
    heads = [out / "head.fold0.pt", out / "head.fold1.pt"]
    for fold, head in enumerate(heads):
        meta = load_checkpoint(head).meta
        assert meta["data"]["fold"] == fold and meta["data"]["images"] == 2
        assert recorded["heads"][fold]["labels_fold"] == 1 - fold
    final, by_head = _scores(out), []
    for fold, head in enumerate(heads):
        apply_head(head, images, tmp_path / f"by{fold}", SMALL, backbone=real_backbone)
        by_head.append(_scores(tmp_path / f"by{fold}"))
    for fold, half in enumerate(recorded["folds"]["images"]):
        other, own = by_head[1 - fold], by_head[fold]
        assert all(final[name] == pytest.approx(other[name]) for name in half)
        assert any(final[name] != pytest.approx(own[name]) for name in half)
    again = self_train_folder(images, out, SMALL, train, backbone=real_backbone)
    assert again.heads_trained == [False, False]
    assert again.stage1.resumed == 4 and again.final.resumed == 4
    # other training options: new heads, and their labels replace the stale ones
    retrained = self_train_folder(
        images, out, SMALL, TrainConfig(epochs=3, batch_size=2), backbone=real_backbone
    )
    assert retrained.heads_trained == [True, True]
    assert retrained.final.labelled == 4 and retrained.final.resumed == 0


def test_self_train_refuses_a_folder_holding_another_run(
    ecssd_dir: Path, real_backbone: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain run (perhaps reviewed) in OUT is not replaced by self-training's labels
    without overwrite: refused before stage 1, its annotations untouched."""
    monkeypatch.setattr("selfment_label.selftrain.MIN_IMAGES", 2)
    images = copy_ecssd(ecssd_dir, tmp_path / "images", [f"{i:04d}" for i in range(5, 9)])
    out = tmp_path / "plain"
    label_folder(images, out, SMALL, backbone=real_backbone)
    before = (out / "annotations.json").read_bytes()
    with pytest.raises(SelfTrainError, match="self-training did not label") as refused:
        self_train_folder(images, out, SMALL, TrainConfig(epochs=1), backbone=real_backbone)
    assert refused.value.remedy == "overwrite"
    assert not (out / "stage1").exists()
    assert (out / "annotations.json").read_bytes() == before


def test_self_train_refuses_a_half_with_too_few_masks_and_keeps_stage1(
    ecssd_dir: Path, real_backbone: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blank image gets no stage-1 mask: its half (0006, blank) has one mask, not two."""
    monkeypatch.setattr("selfment_label.selftrain.MIN_IMAGES", 2)
    images = copy_ecssd(ecssd_dir, tmp_path / "images", ["0005", "0006", "0007"])
    Image.new("RGB", (200, 150), (128, 128, 128)).save(images / "zz_blank.png")
    out = tmp_path / "self"
    with pytest.raises(SelfTrainError, match=r"3 of 4 images \(2 and 1 in the two halves\)"):
        self_train_folder(images, out, SMALL, backbone=real_backbone)
    assert len(read_run(out / "stage1").coco["annotations"]) == 3
    assert not list(out.glob("head*.pt")) and not (out / "annotations.json").exists()


def test_cli_train_layers_rounds_and_apply_flip(
    real_run: Path, layered_head: Path, weights_path: Path, tmp_path: Path
) -> None:
    """From the layered features the fixture cached: no backbone pass for training."""
    out = tmp_path / "cli.pt"
    args = ["train", str(real_run / "run"), "--out", str(out), "--epochs", "1", "--offline"]
    result = CliRunner().invoke(app, [*args, "--layers", "8,11", "--rounds", "1"])
    assert result.exit_code == 0, result.output
    assert "round 1" in result.output and load_checkpoint(out).layers == LAYERS
    for bad, said in (("8,x", "block numbers separated by commas"), ("8,40", "[40]")):
        refused = CliRunner().invoke(app, [*args, "--overwrite", "--layers", bad])
        assert refused.exit_code == 1 and said in refused.output, refused.output
    applied = tmp_path / "applied"
    run = ["apply", str(out), str(real_run / "images"), "--out", str(applied)]
    result = CliRunner().invoke(
        app, [*run, "--weights", str(weights_path), "--flip", "--refine", "none"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((applied / "run.json").read_text())["options"]["flip"] is True


def test_cli_self_train_refuses_a_small_folder_and_ray(real_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "self"
    run = ["run", str(real_run / "images"), "--out", str(out), "--self-train"]
    result = CliRunner().invoke(app, run)
    assert result.exit_code == 1 and "self-training needs at least 20" in result.output
    result = CliRunner().invoke(app, [*run, "--ray"])
    assert result.exit_code == 1 and "drop --ray" in result.output
    result = CliRunner().invoke(app, [*run, "--mode", "instances"])
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "needs the single mode" in message
    assert "use --mode single" in message
    assert not (out / "annotations.json").exists()


def test_flip_is_refused_for_an_instance_head() -> None:
    loaded = HeadCheckpoint(head=InstanceHead(384), meta={}, sha256="0" * 64)
    with pytest.raises(HeadError, match="single-object head only"):
        head_segmenter(loaded, "cpu", flip=True)

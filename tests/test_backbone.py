"""Backbone presets, weight resolution (file, env, hub), layouts and patch features."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from selfment_label_cli.console import describe_error

from selfment_label.features.backbone import build_backbone, resolve_weights_path
from selfment_label.features.presets import PRESETS, WEIGHTS_ENV, BackboneError, get_preset

SMALL = [name for name in PRESETS if "-vits" in name]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_names_a_pretrained_timm_model(name):
    preset = PRESETS[name]
    assert timm.is_model(preset.architecture), preset.architecture
    assert preset.timm_id in timm.list_pretrained(preset.architecture)
    assert f"patch{preset.patch_size}" in preset.architecture


@pytest.mark.parametrize("name", SMALL)
def test_small_presets_give_a_token_grid_for_any_aspect_ratio(name):
    backbone = build_backbone(name, random_init=True, depth=1)
    p = backbone.patch_size
    tokens = backbone.patch_tokens(torch.randn(2, 3, 5 * p, 7 * p))
    assert tokens.shape == (2, 5, 7, backbone.embed_dim)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(BackboneError, match="dinov2-vits14"):
        get_preset("dinov9-huge")


def test_offline_without_weights_names_the_fix(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(BackboneError, match="hub downloads are not allowed") as raised:
        build_backbone("dinov2-vits14", allow_download=False)
    assert raised.value.remedy == "weights"
    assert "pass a local weights file with --weights FILE" in describe_error(raised.value)


def test_failed_hub_download_names_the_fix(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(BackboneError, match=r"vit_small_patch16_224\.dino") as raised:
        build_backbone("dino-vits16")
    assert raised.value.remedy == "weights"
    assert "--weights FILE" in describe_error(raised.value)


def test_weights_come_from_the_argument_then_the_environment(monkeypatch, tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first.write_bytes(b"x")
    second.write_bytes(b"y")
    monkeypatch.setenv(WEIGHTS_ENV, str(second))
    assert resolve_weights_path(first) == first
    assert resolve_weights_path(None) == second
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(BackboneError, match=WEIGHTS_ENV):
        resolve_weights_path(None)


def test_shared_weights_load_and_record_their_hash(real_backbone, weights_path):
    identity = real_backbone.identity()
    assert identity["weights_sha256"] == (
        "dc75e3ddfb5c5c7ccd76eb1cdf4deda601bece43fdfdf8ac2a64fea6c64eb0b7"
    )
    assert real_backbone.embed_dim == 384 and real_backbone.patch_size == 14


def test_official_dinov2_layout_and_pth_container_load(real_backbone, weights_path, tmp_path):
    """An official DINOv2 checkpoint has a mask_token and may come wrapped in a .pth dict."""
    state = load_file(str(weights_path))
    official = {**state, "mask_token": torch.zeros(1, state["cls_token"].shape[-1])}
    safetensors_path = tmp_path / "official.safetensors"
    save_file(official, str(safetensors_path))
    pth_path = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in official.items()}}, pth_path)
    x = torch.randn(1, 3, 56, 70)
    expected = real_backbone.patch_tokens(x)
    for path in (safetensors_path, pth_path):
        loaded = build_backbone("dinov2-vits14", weights=path)
        assert torch.allclose(loaded.patch_tokens(x), expected, atol=1e-5)


def test_mismatched_weights_are_a_clear_error(weights_path):
    with pytest.raises(BackboneError, match="look like dinov2-vits14$") as raised:
        build_backbone("dino-vitb16", weights=weights_path)
    assert raised.value.remedy == "backbone"
    assert "choose that --backbone" in describe_error(raised.value)


def test_wrong_input_size_is_refused(tiny_backbone):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_backbone.patch_tokens(torch.randn(1, 3, 50, 56))


def test_offline_hub_fails_fast_with_one_sentence(tmp_path):
    code = (
        "import time; from selfment_label.features import backbone as b\n"
        "b.hub_reachable = lambda timeout=3.0: False\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    b.build_backbone('dino-vits8')\n"
        "except b.BackboneError as error:\n"
        "    print(f'{time.perf_counter() - start:.1f}', error.remedy, error)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    env.pop("SELFMENT_WEIGHTS", None)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    seconds, remedy, message = result.stdout.split(" ", 2)
    assert float(seconds) < 15, result.stdout
    assert "unreachable" in message and remedy == "weights"
    assert "Retrying" not in result.stderr

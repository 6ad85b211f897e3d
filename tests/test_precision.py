"""Backbone precision: what ``auto`` resolves to, the bf16 CPU form, and masks against fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_precision import mask_ious
from selfment_label.config import RunConfig
from selfment_label.device import CPU_BF16_FLAGS, cpu_bf16_support, resolve_precision
from selfment_label.features.backbone import Backbone
from selfment_label.features.bf16_cpu import FusedLinear, bf16_cpu_model, fused_linear_available
from selfment_label.runfolder.label import label_folder
from selfment_label.runfolder.layout import RUN_NAME

CPU = torch.device("cpu")


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    return set(lines[0].split(":", 1)[1].split()) if lines else set()


def test_auto_resolves_from_this_cpus_flags():
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to check against")
    native = any(flag in flags for flag in CPU_BF16_FLAGS)
    choice = resolve_precision("auto", CPU)
    assert choice.asked == "auto"
    assert choice.name == ("bf16" if native else "fp32")
    assert choice.dtype == (torch.bfloat16 if native else None)
    assert ("natively" in choice.reason) == native
    assert choice.as_dict() == {"asked": "auto", "used": choice.name, "reason": choice.reason}


def test_auto_on_a_cpu_without_bf16_is_fp32(monkeypatch):
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    assert cpu_bf16_support() is None
    choice = resolve_precision("auto", CPU)
    assert choice.name == "fp32" and "neither AMX nor AVX512-BF16" in choice.reason
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_precision("auto", CPU).name == "bf16"
    assert "AMX" in resolve_precision("auto", CPU).reason


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), "bf16"), ((8, 6), "bf16"), ((7, 5), "fp16"), ((6, 1), "fp32")],
)
def test_auto_on_cuda_picks_by_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    choice = resolve_precision("auto", torch.device("cuda"))
    assert choice.name == expected
    assert f"{capability[0]}.{capability[1]}" in choice.reason


def test_explicit_precisions_pass_through_and_unknown_ones_are_refused():
    for name in ("fp32", "fp16", "bf16"):
        assert resolve_precision(name, CPU).name == name
    assert resolve_precision("auto", torch.device("meta")).name == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", CPU)
    assert RunConfig().precision == "auto"


def test_bf16_cpu_form_matches_fp32_and_leaves_the_model_alone(tiny_backbone: Backbone):
    reduced = bf16_cpu_model(tiny_backbone.model)
    assert next(tiny_backbone.model.parameters()).dtype == torch.float32
    assert next(reduced.parameters()).dtype == torch.bfloat16
    if fused_linear_available():
        fused = [m for m in reduced.modules() if isinstance(m, FusedLinear)]
        assert fused and not any(isinstance(m, torch.nn.Linear) for m in reduced.modules())
        assert sum(m.gelu is not None for m in fused) == len(reduced.blocks)
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 56, 84)
    full = tiny_backbone.patch_tokens(pixels)
    half = tiny_backbone.patch_tokens(pixels, torch.bfloat16)
    assert half.dtype == torch.float32 and half.shape == full.shape
    cosine = F.cosine_similarity(full.flatten(0, 2), half.flatten(0, 2), dim=-1)
    assert cosine.min() > 0.99


def test_auto_masks_match_fp32_on_real_images(
    real_backbone: Backbone, ecssd_dir: Path, tmp_path: Path
):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("0001.jpg", "0002.jpg", "0003.jpg", "0004.jpg"):
        (images / name).symlink_to((ecssd_dir / "images" / name).resolve())
    runs = {}
    for precision in ("fp32", "auto"):
        runs[precision] = tmp_path / precision
        config = RunConfig(precision=precision)
        label_folder(images, runs[precision], config, backbone=real_backbone)
    recorded = json.loads((runs["auto"] / RUN_NAME).read_text())["precision"]
    assert recorded == resolve_precision("auto", CPU).as_dict()
    ious = mask_ious(runs["fp32"], runs["auto"])
    assert len(ious) == 4
    assert min(ious.values()) >= 0.98, f"IoU between auto and fp32 masks: {ious}"


@pytest.mark.cuda
def test_cuda_auto_masks_match_the_cpus(weights_path: Path, ecssd_dir: Path, tmp_path: Path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("0001.jpg", "0002.jpg", "0003.jpg", "0004.jpg"):
        (images / name).symlink_to((ecssd_dir / "images" / name).resolve())
    runs = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "auto")):
        runs[device] = tmp_path / device
        config = RunConfig(weights=str(weights_path), device=device, precision=precision)
        label_folder(images, runs[device], config)
    recorded = json.loads((runs["cuda"] / RUN_NAME).read_text())["precision"]
    assert recorded["used"] in ("bf16", "fp16", "fp32") and recorded["asked"] == "auto"
    ious = mask_ious(runs["cpu"], runs["cuda"])
    assert min(ious.values()) >= 0.98, f"IoU between CUDA auto and CPU fp32 masks: {ious}"

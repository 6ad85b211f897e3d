"""The speed benchmark's plumbing (tiny random ViT, a few synthetic images; nothing timed)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import label_tiny, write_scenes

from benchmarks.speed import (
    BenchConfig,
    Target,
    ncut_speedup,
    peak_rss_of_run,
    run_bench,
)
from selfment_label import engine
from selfment_label.config import RunConfig
from selfment_label.device import small_kernel_threads
from selfment_label.segment.base import segmenter_tokens

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if "__main__" in p.read_text())


@pytest.fixture()
def scenes(tmp_path: Path) -> Path:
    """Five small images with a bright block on a dark background."""
    return write_scenes(tmp_path / "images", 5, size=(90, 70), name="{}.png")


def test_target_direction():
    assert Target("speed", 0.9, 0.85).passed
    assert not Target("speed", 0.8, 0.85).passed
    assert Target("memory", 1.1, 1.2, higher_is_better=False).passed
    assert not Target("memory", 1.3, 1.2, higher_is_better=False).passed


def test_run_bench_reports_every_stage_and_target(scenes, tiny_backbone):
    config = BenchConfig(
        images=scenes,
        device="cpu",
        resolutions=(56, 84),
        batch_size=2,
        limit=4,
        rounds=1,
        ncut_grid=(6, 7),
        rss_counts=(),
        precisions=("fp32", "bf16"),
    )
    report = run_bench(config, backbone=tiny_backbone)
    assert [t.resolution for t in report.throughput] == [56, 84]
    for row in report.throughput:
        assert row.images == 4 and row.bare_fp32_ips > 0
        assert set(row.runs) == {"fp32", "bf16"}
        for name, run in row.runs.items():
            assert run.used == name and run.bare_ips > 0 and run.end_to_end_ips > 0
            assert row.ratio(name) == pytest.approx(run.end_to_end_ips / row.bare_fp32_ips)
            assert {"backbone", "ncut", "ipo", "masks", "write"} <= set(run.stage_ms)
    assert report.ncut is not None and report.ncut["patches"] == 42
    names = [t.name for t in report.targets]
    assert len(names) == 6 and "NCut eigenvector |cos| vs scipy" in names
    bounds = {t.name.split(" / ")[0]: t.bound for t in report.targets if "end-to-end" in t.name}
    assert bounds == {"end-to-end fp32 (fp32)": 0.85, "end-to-end bf16 (bf16)": 2.0}
    assert report.machine["torch_threads"] == torch.get_num_threads()
    as_dict = report.as_dict()["throughput"][0]
    assert as_dict["resolution"] == 56 and "ratio_to_bare_fp32" in as_dict["runs"]["bf16"]


def test_ncut_check_agrees_with_scipy(scenes, tiny_backbone):
    result = ncut_speedup(tiny_backbone, scenes, grid=(8, 8), repeats=1)
    assert result["patches"] == 64
    assert result["cos"] >= 0.999


def test_small_kernel_threads_pins_the_count_and_restores_the_setting():
    before = torch.get_num_threads()
    try:
        for caller in (1, 3):  # fewer and more threads than the block's
            torch.set_num_threads(caller)
            with small_kernel_threads(torch.device("cpu"), threads=2):
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == caller
    finally:
        torch.set_num_threads(before)


def test_backbone_thread_keeps_the_callers_thread_count(
    scenes, tiny_backbone, tmp_path, monkeypatch
):
    """The backbone-ahead thread computes with the caller's torch thread count, not with the
    count some other thread set last (a new thread's count is fixed by its first kernel)."""
    seen: list[int] = []

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return segmenter_tokens(*args, **kwargs)

    monkeypatch.setattr(engine, "segmenter_tokens", recording)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        other = threading.Thread(target=torch.set_num_threads, args=(3,))
        other.start()  # the last count set in the process is now 3; this thread's is 1
        other.join()
        label_tiny(scenes, tmp_path / "out", tiny_backbone, mode="single")
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}


@pytest.mark.slow
def test_peak_rss_child_labels_the_repeated_folder(scenes, weights_path, tmp_path):
    config = RunConfig(weights=str(weights_path), resolution=56, device="cpu", batch_size=2)
    work = tmp_path / "work"
    work.mkdir()
    names = sorted(p.name for p in scenes.iterdir())[:2]
    result = peak_rss_of_run(scenes, names, 3, config, work)
    assert result["images"] == 3
    assert result["peak_rss_mb"] > 50
    assert len(list((work / "rss-3").iterdir())) == 3


def test_bench_script_help():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine.py"
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--resolution" in done.stdout and "--rss-counts" in done.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_benchmark_imports_alike_as_a_file_and_as_a_module(script: Path):
    """No script imports a sibling by its bare name (only a file run finds it), and one that
    imports the benchmarks package first puts the checkout on the path when run as a file."""
    source = script.read_text()
    siblings = {path.stem for path in BENCHMARKS.glob("*.py")}
    bare = set(re.findall(r"^\s*from (\w+) import", source, re.M)) & siblings
    assert not bare, f"{script.name} imports {bare} by a bare name: use benchmarks.{min(bare)}"
    if "from benchmarks." in source:
        assert "if not __package__:" in source, f"{script.name} cannot run as a file"
        assert source.index("if not __package__:") < source.index("from benchmarks.")


def test_a_benchmark_that_imports_another_runs_both_ways(tmp_path: Path):
    """review_loop imports head_ecssd: its help shows as a file (from any folder) and as a
    module (from the checkout)."""
    forms = {
        tmp_path: [sys.executable, str(BENCHMARKS / "review_loop.py"), "--help"],
        BENCHMARKS.parent: [sys.executable, "-m", "benchmarks.review_loop", "--help"],
    }
    for cwd, command in forms.items():
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)
        assert result.returncode == 0, result.stderr
        assert "--reject-iou" in result.stdout

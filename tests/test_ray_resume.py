"""``run --ray``: SIGKILL the driver in the middle of a run, run it again: only what is missing
is labelled, nothing twice, and the local Ray instance the driver started dies with it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pycocotools.coco import COCO

pytest.importorskip("ray", reason="the ray extra is not installed")

CLI = [sys.executable, "-m", "selfment_label_cli"]


def _journal_lines(out: Path) -> int:
    journal = out / "journal.jsonl"
    return journal.read_bytes().count(b"\n") if journal.exists() else 0


def _outliving(processes: list, seconds: float) -> list:
    """The processes still running (zombies count as gone) after waiting up to ``seconds``."""
    import psutil

    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(1)


def test_killed_driver_resumes_with_only_what_is_missing(tmp_path, ecssd_dir, weights_path):
    """The CLI with --ray starts its own Ray instance; SIGKILL the driver mid-run, run again."""
    import psutil

    images = tmp_path / "images"
    images.mkdir()
    for index in range(1, 41):
        name = f"{index:04d}.jpg"
        shutil.copy(ecssd_dir / "images" / name, images / name)
    out = tmp_path / "run"
    cmd = [*CLI, "run", str(images), "--out", str(out), "--weights", str(weights_path)]
    cmd += ["--resolution", "112", "--batch-size", "1", "--ray", "--ray-actors", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and _journal_lines(out) < 4 and driver.poll() is None:
        time.sleep(0.05)
    ray_processes = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # the local instance the driver started goes with it: Ray's services stop when their
    # driver dies (its agents notice within a minute or two)
    alive = _outliving(ray_processes, seconds=150)
    for process in alive:
        process.kill()
    assert not alive, f"Ray processes outlived their driver: {[p.name() for p in alive]}"
    done_before = _journal_lines(out) - 1
    assert 3 <= done_before < 40, "the kill must land in the middle of the run"
    assert not (out / "annotations.json").exists()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from_journal"] >= done_before
    assert run["resumed_from_journal"] + run["labelled_this_invocation"] == 40
    names = [image["file_name"] for image in COCO(str(out / "annotations.json")).dataset["images"]]
    assert sorted(names) == sorted(set(names)) and len(names) == 40

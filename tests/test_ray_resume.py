"""``run --ray``: SIGKILL the driver in the middle of a run, run it again: only what is missing
is labelled, nothing twice, and the local Ray instance the driver started dies with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import (
    TINY_RESOLUTION,
    assert_killed_mid_run,
    assert_resumed_only_the_missing,
    copy_ecssd,
    ecssd_stems,
    wait_for_journal,
)

pytest.importorskip("ray", reason="the ray extra is not installed")

CLI = [sys.executable, "-m", "selfment_label_cli"]


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

    images = copy_ecssd(ecssd_dir, tmp_path / "images", ecssd_stems(40))
    out = tmp_path / "run"
    cmd = [*CLI, "run", str(images), "--out", str(out), "--weights", str(weights_path)]
    cmd += ["--resolution", str(TINY_RESOLUTION), "--batch-size", "1", "--ray", "--ray-actors", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_for_journal(out, 4, 240, driver)
    ray_processes = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # the local instance the driver started goes with it: Ray's services stop when their
    # driver dies (its agents notice within a minute or two)
    alive = _outliving(ray_processes, seconds=150)
    for process in alive:
        process.kill()
    assert not alive, f"Ray processes outlived their driver: {[p.name() for p in alive]}"
    done_before = assert_killed_mid_run(out, at_least=3, total=40)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr
    assert_resumed_only_the_missing(out, done_before, total=40)

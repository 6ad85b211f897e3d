"""Per-stage wall-clock accounting that is honest on CUDA (synchronises at stage ends)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimer:
    """Accumulates seconds per named stage.

    Arguments:
      device: when CUDA, each stage synchronises the device before reading the clock so
        that asynchronous kernels are charged to the stage that launched them.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.seconds: dict[str, float] = defaultdict(float)
        self._cuda = torch.device(device).type == "cuda"

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body of a ``with`` block as ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        """Charge ``seconds`` measured elsewhere (a worker thread) to ``name``."""
        self.seconds[name] += seconds

    def as_dict(self) -> dict[str, float]:
        """Seconds per stage, rounded to the millisecond."""
        return {k: round(v, 3) for k, v in self.seconds.items()}

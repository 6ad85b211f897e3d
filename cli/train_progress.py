"""Progress bars of ``selfment-label train``: the features, then one bar per training phase."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import Progress, TaskID

from .console import make_progress


def loss_text(losses: dict[str, float]) -> str:
    """The loss terms of a step, in the order the library gives them."""
    return "  ".join(f"{term} {value:.4f}" for term, value in losses.items())


class TrainingBars:
    """A features bar and one bar per phase (the single head's training, each round of the
    instance head), started when the phase's first step is reported.

    Arguments:
      progress: the live progress display.
      phases: the phases' names.
    """

    def __init__(self, progress: Progress, phases: list[str]):
        self.progress = progress
        self.phases = phases
        self.features_bar = progress.add_task("features", total=None)
        self.bars: list[TaskID] = [
            progress.add_task(phase, total=None, start=False) for phase in phases
        ]

    def features(self, done: int, total: int) -> None:
        """Report the features gathered so far."""
        self.progress.update(self.features_bar, completed=done, total=total)

    def step(self, phase: int, step: int, total: int, losses: dict[str, float]) -> None:
        """Report a training step of phase number ``phase``."""
        bar = self.bars[phase]
        self.progress.start_task(bar)
        description = f"{self.phases[phase]} {loss_text(losses)}"
        self.progress.update(bar, completed=step, total=total, description=description)


@contextmanager
def training_bars(phases: list[str]) -> Iterator[TrainingBars]:
    """Show the bars of a training with ``phases`` while the block runs."""
    with make_progress() as progress:
        yield TrainingBars(progress, phases)

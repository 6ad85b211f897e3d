"""Segmenter selection: a run's ``mode`` names how tokens become masks.

- ``single``: one main object per image (NCut + IPO).
- ``instances``: several objects, one annotation each, never overlapping (MaskCut + IPO).
- ``entities``: entities that cover the image and their parts, as a two-level tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .entities import Entities
from .instances import MaskCut
from .segment import NcutIpo, Segmenter

if TYPE_CHECKING:
    from .run import RunConfig

MODES = ("single", "instances", "entities")


def make_segmenter(config: RunConfig) -> Segmenter:
    """The segmenter that a run's options ask for.

    Arguments:
      config: the run options (``mode`` and the options of that mode).

    Raises:
      ValueError: unknown mode.
    """
    if config.mode == "single":
        return NcutIpo(tau=config.tau, ipo_iters=config.ipo_iters)
    if config.mode == "instances":
        return MaskCut(
            tau=config.tau,
            ipo_iters=config.ipo_iters,
            max_instances=config.max_instances,
            min_area=config.min_area,
        )
    if config.mode == "entities":
        return Entities(
            merge_floor=config.merge_floor,
            persistence=config.persistence,
            min_area=config.min_area,
        )
    raise ValueError(f"unknown mode {config.mode!r}: choose one of {', '.join(MODES)}")

"""Mode registry: a run's mode names the segmenter that turns tokens into masks.

- ``single``: one main object per image (NCut + IPO).
- ``instances``: several objects, one annotation each, never overlapping (MaskCut + IPO).
- ``entities``: entities that cover the image and their parts, as a two-level tree.
"""

from __future__ import annotations

from dataclasses import asdict

from ..config import ModeConfig
from .base import Segmenter
from .entities import Entities
from .instances import MaskCut
from .single import NcutIpo

SEGMENTERS: dict[str, type] = {
    NcutIpo.mode: NcutIpo,
    MaskCut.mode: MaskCut,
    Entities.mode: Entities,
}


def make_segmenter(config: ModeConfig) -> Segmenter:
    """The segmenter of a mode's options (``RunConfig.segment``).

    Arguments:
      config: a ``SingleConfig``, ``InstancesConfig`` or ``EntitiesConfig``.
    """
    return SEGMENTERS[config.mode](**asdict(config))

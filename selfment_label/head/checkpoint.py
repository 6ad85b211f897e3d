"""Head checkpoints: the weights and everything needed to use them safely.

A checkpoint records the backbone preset, timm id, weights sha256, resolution, feature
dimension, tool version, training options and data; loading refuses anything else, and
``check_backbone`` refuses a backbone other than the one the head learnt on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_path
from ..config import MAX_RESOLUTION, MIN_RESOLUTION, check_int
from ..errors import SelfmentError
from ..features.backbone import Backbone, error_summary, file_sha256
from .instance_model import InstanceHead
from .model import PatchHead

CHECKPOINT_FORMAT = "selfment-label-head/1"


class HeadError(SelfmentError, RuntimeError):
    """A run folder or checkpoint cannot be used to train or apply a head."""


class HeadMismatch(HeadError):
    """The head was trained on another backbone's features than the one it would run on."""


def check_identity(expected: dict[str, Any], backbone: Backbone, what: str) -> None:
    """Raise ``HeadMismatch`` unless ``backbone`` is the one ``expected`` describes."""
    actual = backbone.identity()
    problems = [
        f"{key} {expected.get(key)!r} vs {actual.get(key)!r}"
        for key in ("backbone", "timm_id", "weights_sha256")
        if expected.get(key) != actual.get(key)
    ]
    if problems:
        raise HeadMismatch(
            f"{what} another backbone than the one loaded ({'; '.join(problems)})",
            remedy="head_weights",
        )


def save_checkpoint(path: Path, head: nn.Module, meta: dict[str, Any]) -> None:
    """Write the head's weights and metadata atomically."""
    with atomic_path(path) as tmp:
        torch.save({"meta": meta, "state_dict": head.state_dict()}, tmp)


@dataclass
class HeadCheckpoint:
    """A loaded head and its metadata.

    Arguments:
      head: the head (eval mode, CPU): a ``PatchHead``, or an ``InstanceHead`` when
        ``meta["task"]`` is ``instances``.
      meta: what ``distil`` (or ``distil_instances``) recorded (backbone, resolution,
        feature_dim, training, data; the instance head's model and rounds).
      sha256: sha256 of the checkpoint file.
    """

    head: PatchHead | InstanceHead
    meta: dict[str, Any]
    sha256: str

    @property
    def layers(self) -> tuple[int, ...] | None:
        """The backbone blocks whose tokens the head reads (None: the last layer's; heads
        saved before layers were recorded read the last layer's)."""
        layers = self.meta.get("layers")
        return tuple(int(layer) for layer in layers) if layers else None

    def check_backbone(self, backbone: Backbone) -> None:
        """Raise ``HeadMismatch`` unless ``backbone`` gives the features the head learnt on."""
        check_identity(self.meta["backbone"], backbone, "this head was trained on")
        try:
            backbone.check_layers(self.layers)
        except ValueError as error:
            raise HeadMismatch(f"this head reads {error}") from None
        given = backbone.embed_dim * len(self.layers or (None,))
        if given != self.meta["feature_dim"]:
            raise HeadMismatch(
                f"this head expects {self.meta['feature_dim']}-dimensional features but "
                f"the backbone gives {given}"
            )


def _build_head(meta: dict[str, Any]) -> PatchHead | InstanceHead:
    """The (untrained) head a checkpoint's metadata describes."""
    if meta.get("task", "single") == "instances":
        return InstanceHead(**{k: int(v) for k, v in meta["model"].items()})
    return PatchHead(int(meta["feature_dim"]), int(meta["hidden"]))


def _check_meta(meta: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless the metadata a head is used by is there and in range."""
    if not isinstance(meta.get("backbone"), dict) or not isinstance(
        meta["backbone"].get("backbone"), str
    ):
        raise ValueError("it does not record its backbone")
    for key in ("training", "data", "tool_version"):
        if key not in meta:
            raise ValueError(f"it does not record its {key}")
    check_int("resolution", meta.get("resolution"), MIN_RESOLUTION, MAX_RESOLUTION)
    check_int("feature_dim", meta.get("feature_dim"), 1)
    check_int("hidden", meta.get("hidden"), 1)
    layers = meta.get("layers")
    if layers is not None and not (
        isinstance(layers, list) and layers and all(type(v) is int and v >= 0 for v in layers)
    ):
        raise ValueError(f"its layers {layers!r} are not a list of block indices")


def load_checkpoint(path: str | Path) -> HeadCheckpoint:
    """Read a head checkpoint.

    Raises:
      HeadError: the file is missing, not a selfment-label head, or holds non-finite weights.
    """
    path = Path(path)
    if not path.is_file():
        raise HeadError(f"head checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = payload["meta"]
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        _check_meta(meta)
        head = _build_head(meta)
        head.load_state_dict(payload["state_dict"])
    except Exception as error:  # torch/pickle errors come in many types
        raise HeadError(
            f"{path} is not a selfment-label head checkpoint, or it is damaged: "
            f"{error_summary(error)}"
        ) from None
    if not all(torch.isfinite(value).all() for value in head.state_dict().values()):
        raise HeadError(
            f"{path} holds non-finite weights (its training diverged): it would label no image",
            remedy="lr",
        )
    head.eval().requires_grad_(False)
    return HeadCheckpoint(head=head, meta=meta, sha256=file_sha256(path))

"""Label a folder with a trained head: the same pipeline and run folder as ``run``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..config import HEAD_FLIP, InstanceApplyConfig, RunConfig
from ..engine import Executor, LocalExecutor, backbone_for
from ..features.backbone import Backbone, WeightsMismatch, file_sha256
from ..runfolder.label import check_run_target, default_out_dir, label_folder
from ..runfolder.layout import RUN_NAME
from ..runfolder.record import ProgressCallback, RunSummary
from ..segment.base import PatchMask
from ..timing import StageTimer
from .checkpoint import HeadCheckpoint, HeadError, load_checkpoint
from .instance_apply import InstanceHeadSegmenter
from .instance_model import InstanceHead
from .model import PatchHead, mask_score


@dataclass
class HeadSegmenter:
    """Segmenter that runs a trained head on patch tokens (one mask per image).

    The patch scores are softmax[:, 1]; the mask's score is the mean foreground probability
    of the patches above 0.5 (0 when there are none).

    Arguments:
      head: the trained head, on the backbone's device.
      head_sha256: sha256 of its checkpoint (recorded, and compared when a run resumes).
      layers: the backbone blocks whose tokens the head reads (None: the last layer's).
      flip: test-time flip: the mirrored image goes through the backbone too (in the same
        batch) and the head's foreground logits of both, mirrored back, are averaged.
    """

    head: PatchHead
    head_sha256: str
    layers: tuple[int, ...] | None = None
    flip: bool = False

    def options(self) -> dict[str, Any]:
        """Options that decide the masks (``flip`` only when on: runs made before it resume)."""
        flip = {"flip": True} if self.flip else {}
        return {"mode": "head", "head_sha256": self.head_sha256, **flip}

    def to(self, device: torch.device | str) -> HeadSegmenter:
        """This segmenter with its head on ``device`` (a Ray actor moves it to its GPU)."""
        return replace(self, head=self.head.to(device))

    def tokens(
        self, backbone: Backbone, pixels: torch.Tensor, dtype: torch.dtype | None
    ) -> torch.Tensor:
        """The tokens the head reads: its layers' for the batch, then for its mirror image."""
        views = torch.cat([pixels, pixels.flip(-1)]) if self.flip else pixels
        return backbone.patch_tokens(views, dtype, self.layers)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, timer: StageTimer) -> list[list[PatchMask]]:
        """One ``PatchMask`` per image of a ``[B, rows, cols, D]`` batch (``[2B, ...]``, the
        mirror images last, with ``flip``)."""
        with timer.stage("head"):
            logit = self.head.foreground_logit(tokens.float())
            if self.flip:
                images = len(logit) // 2
                logit = (logit[:images] + logit[images:].flip(-1)) / 2
            probability = torch.sigmoid(logit)
            score = mask_score(probability).tolist()
        return [[PatchMask(scores=probability[i], score=score[i])] for i in range(len(score))]


def recorded_weights(meta: dict[str, Any]) -> str | None:
    """The weights file of the run a head was trained on, when it is still there with the
    sha256 the head records."""
    sha = meta["backbone"].get("weights_sha256")
    try:
        run = json.loads((Path(meta["data"]["run_dir"]) / RUN_NAME).read_text(encoding="utf-8"))
        recorded = run["backbone"]["weights_file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not recorded or not sha or not Path(recorded).is_file():
        return None
    return recorded if file_sha256(recorded) == sha else None


def head_segmenter(
    loaded: HeadCheckpoint,
    device: torch.device | str,
    instances: InstanceApplyConfig | None = None,
    flip: bool = False,
) -> HeadSegmenter | InstanceHeadSegmenter:
    """The segmenter of a loaded head on ``device``: one mask per image for the single head
    (on the layers it learnt on; ``flip``: with test-time flip), the selected scored masks
    (``instances``, defaults when None) for an instance head."""
    head = loaded.head.to(device)
    if isinstance(head, InstanceHead):
        if flip:
            raise HeadError("test-time flip is an option of the single-object head only")
        return InstanceHeadSegmenter(head, loaded.sha256, instances or InstanceApplyConfig())
    return HeadSegmenter(head, loaded.sha256, loaded.layers, flip)


def _check_zoomable(head: PatchHead | InstanceHead) -> None:
    """Refuse zoom for a head whose masks cannot be merged across crops."""
    if not isinstance(head, InstanceHead):
        raise HeadError("zoom needs an instance head: a single-object head writes one mask")
    if head.part_queries is not None:
        raise HeadError("zoom needs an instance head without parts: this one writes parts")


def apply_head(
    checkpoint: str | Path,
    input_dir: str | Path,
    out_dir: str | Path | None = None,
    config: RunConfig | None = None,
    *,
    overwrite: bool = False,
    backbone: Backbone | None = None,
    progress: ProgressCallback | None = None,
    executor: Executor | None = None,
    instances: InstanceApplyConfig | None = None,
    flip: bool = HEAD_FLIP,
    extra_provenance: dict[str, Any] | None = None,
) -> RunSummary:
    """Label a folder with a trained head; writes the same run folder as ``run``.

    The backbone preset and resolution come from the checkpoint (those of ``config`` are
    replaced); the weights from ``config.weights``, else the weights file the head was
    trained with when it is still there with the same sha256, else ``$SELFMENT_WEIGHTS`` or
    the hub.

    Arguments:
      checkpoint: a head saved by ``distil``.
      input_dir: the image folder.
      out_dir: the run folder.
      config: run options (device, batch size, workers, save_scores, weights...).
      overwrite: replace a run folder made with other options.
      backbone: a ready backbone (tests); must match the head's.
      progress: called after every image with ``(done, total, file_name, skip_reason)``.
      executor: where the labelling runs (this process when None; ``RayExecutor``: a Ray
        cluster).
      instances: which masks an instance head writes (defaults when None; a single head
        ignores it).
      flip: single head: test-time flip (the mirrored image too, the two foreground logits
        averaged; about twice the backbone's time). Refused for an instance head.
      (``config.zoom``: an instance head without parts only, ``selfment_label.zoom``.)
      extra_provenance: more keys for run.json (``self_train_folder`` records its stages).

    Raises:
      HeadError / HeadMismatch: unusable checkpoint, or a backbone other than the head's.
      Everything ``label_folder`` raises.
    """
    start = time.perf_counter()
    check_run_target(Path(out_dir) if out_dir else default_out_dir(input_dir), overwrite)
    loaded = load_checkpoint(checkpoint)
    meta = loaded.meta
    if config is not None and config.zoom is not None:
        _check_zoomable(loaded.head)
    config = replace(
        config or RunConfig(),
        backbone=meta["backbone"]["backbone"],
        resolution=int(meta["resolution"]),
    )
    if config.weights is None and backbone is None:
        config = replace(config, weights=recorded_weights(meta))
    executor = executor or LocalExecutor()
    if backbone is None:
        try:
            backbone = backbone_for(replace(config, device=executor.model_device(config)))
        except WeightsMismatch as error:
            raise error.for_fixed_preset("the head") from None
    loaded.check_backbone(backbone)
    segmenter = head_segmenter(loaded, backbone.device, instances, flip)
    provenance = {
        "head": {
            "checkpoint": str(Path(checkpoint).resolve()),
            "sha256": loaded.sha256,
            "training": meta["training"],
            "layers": loaded.layers,
            "data": meta["data"],
            "tool_version": meta["tool_version"],
        },
        **(extra_provenance or {}),
    }
    return label_folder(
        input_dir,
        out_dir,
        config,
        overwrite=overwrite,
        backbone=backbone,
        segmenter=segmenter,
        progress=progress,
        extra_provenance=provenance,
        load_seconds=time.perf_counter() - start,
        executor=executor,
    )

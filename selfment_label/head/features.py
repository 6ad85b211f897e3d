"""The backbone features of a run's images: read from the feature cache, computed (with the
run's own backbone) only for the images it lacks.

Training a head and review's image embeddings both read them, so a run's images go through
the backbone once at most.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import DEFAULT_PRECISION
from ..device import resolve_precision
from ..features.backbone import Backbone, WeightsMismatch, build_backbone
from ..features.cache import CacheSettings, FeatureCache, FeatureProgress, ensure_features
from ..features.presets import get_preset
from ..runfolder.layout import FEATURES_DIR, RunFolder
from .checkpoint import HeadError, HeadMismatch, check_identity


def run_features(
    source: RunFolder,
    file_names: list[str],
    *,
    cache_dir: str | Path | None = None,
    weights: str | Path | None = None,
    device: str = "cpu",
    precision: str = DEFAULT_PRECISION,
    allow_download: bool = True,
    backbone: Backbone | None = None,
    progress: FeatureProgress | None = None,
    layers: tuple[int, ...] | None = None,
) -> tuple[FeatureCache, dict[str, Path]]:
    """The feature cache of a run and the entries of ``file_names`` in it (missing ones made).

    Arguments:
      source: the run folder (its ``run.json`` names the backbone and resolution).
      file_names: images wanted, relative to the run's input folder.
      cache_dir: feature cache folder (default ``RUN_DIR/features``).
      weights: backbone weights file, when features must be computed (default: the file
        recorded in run.json, then ``$SELFMENT_WEIGHTS``, then the hub).
      device: device of the backbone, when features must be computed.
      precision: backbone precision (``auto`` resolved on ``device``, or on the ready
        ``backbone``'s device); the cache keeps each precision's features apart.
      allow_download: whether hub downloads are allowed.
      backbone: a ready backbone (tests); must match the run's.
      progress: called with ``(done, total)`` while features are gathered.
      layers: the backbone blocks whose tokens are wanted, concatenated (None: the last
        layer's).

    Returns:
      The cache and file name -> cache entry (images that cannot be decoded are left out).

    Raises:
      HeadMismatch: the backbone preset changed, or the one built is not the run's.
      CacheError: an image is gone and not cached.
      BackboneError: features must be computed and no weights can be had.
    """
    identity = source.backbone
    preset = get_preset(identity["backbone"])
    if preset.timm_id != identity.get("timm_id"):
        raise HeadMismatch(
            f"the run used {identity.get('timm_id')} but preset {preset.name} is now "
            f"{preset.timm_id}"
        )
    recorded = identity.get("weights_file")
    if weights is None and recorded and Path(recorded).is_file():
        weights = recorded

    def make_backbone() -> Backbone:
        try:
            built = backbone or build_backbone(
                preset.name, weights, device, allow_download=allow_download
            )
        except WeightsMismatch as error:
            raise error.for_fixed_preset("the run") from None
        check_identity(identity, built, "the run's masks were made with")
        try:
            built.check_layers(layers)
        except ValueError as error:
            raise HeadError(f"the head cannot read {error}") from None
        return built

    settings = CacheSettings(
        backbone=preset.name,
        timm_id=preset.timm_id,
        weights_sha256=identity.get("weights_sha256"),
        resolution=source.resolution,
        patch_size=preset.patch_size,
        precision=resolve_precision(
            precision, backbone.device if backbone else torch.device(device)
        ).name,
        layers=layers,
    )
    cache = FeatureCache(Path(cache_dir) if cache_dir else source.path / FEATURES_DIR, settings)
    entries = ensure_features(cache, source.input_dir, file_names, make_backbone, progress=progress)
    return cache, entries

"""Self-supervised ViT backbones: a preset -> a frozen timm model -> last-layer patch tokens.

Weights come, in this order, from an explicit file (``--weights``), from the
``SELFMENT_WEIGHTS`` environment variable, or from the model hub through timm when downloads
are allowed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DEFAULT_BACKBONE
from .presets import WEIGHTS_ENV, BackboneError, BackbonePreset, get_preset

logger = logging.getLogger(__name__)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights_path(weights: str | Path | None) -> Path | None:
    """The weights file to use: the explicit argument, else ``$SELFMENT_WEIGHTS``, else None."""
    candidate = weights if weights else os.environ.get(WEIGHTS_ENV) or None
    if candidate is None:
        return None
    path = Path(candidate).expanduser()
    if not path.is_file():
        source = "--weights" if weights else f"${WEIGHTS_ENV}"
        raise BackboneError(f"weights file given by {source} does not exist: {path}")
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth/.pt checkpoint and unwrap the usual containers."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("teacher", "model", "state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"{path} does not hold a state dict")
    prefixes = ("module.", "backbone.")
    cleaned = {}
    for name, tensor in state.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        cleaned[name] = tensor
    return cleaned


def _load_weights_file(model: torch.nn.Module, path: Path) -> None:
    """Load timm-layout weights, falling back to timm's converter for official layouts."""
    state = _read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
        return
    except RuntimeError as first_error:
        converted = _convert_official_layout(state, model)
        if converted is None:
            raise BackboneError(
                f"weights in {path} do not match {type(model).__name__}: {first_error}"
            ) from first_error
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as error:
        raise BackboneError(f"weights in {path} do not match the backbone: {error}") from error
    logger.info("converted official checkpoint layout of %s to timm names", path)


def _convert_official_layout(
    state: dict[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor] | None:
    """Map an official DINO/DINOv2/DINOv3 checkpoint to timm names with timm's own filters."""
    import timm.models.eva as eva
    import timm.models.vision_transformer as vit

    module = vit if isinstance(model, vit.VisionTransformer) else eva
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return None
    try:
        return filter_fn(dict(state), model)
    except Exception as error:  # timm's filters raise assorted errors on foreign layouts
        logger.debug("timm checkpoint filter failed: %s", error)
        return None


@dataclass
class Backbone:
    """A frozen ViT that returns last-layer patch tokens on a patch grid.

    Arguments:
      model: the timm model (``num_classes=0``, ``dynamic_img_size=True``).
      preset: the preset it was built from.
      weights_file: the local weights file used, if any.
      weights_sha256: sha256 of that file, or None for hub weights.
    """

    model: torch.nn.Module
    preset: BackbonePreset
    weights_file: Path | None
    weights_sha256: str | None

    @property
    def patch_size(self) -> int:
        """Side of a patch in pixels."""
        return self.preset.patch_size

    @property
    def embed_dim(self) -> int:
        """Dimension of the patch tokens."""
        return int(self.model.num_features)

    @property
    def device(self) -> torch.device:
        """Device holding the model weights."""
        return next(self.model.parameters()).device

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Normalisation constants the model was trained with (timm's data config)."""
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(self.model)
        return tuple(cfg["mean"]), tuple(cfg["std"])

    def identity(self) -> dict[str, str | int | None]:
        """What defines the features this backbone produces (for provenance and cache keys)."""
        return {
            "backbone": self.preset.name,
            "timm_id": self.preset.timm_id,
            "patch_size": self.patch_size,
            "weights_file": str(self.weights_file) if self.weights_file else None,
            "weights_sha256": self.weights_sha256,
        }

    @torch.inference_mode()
    def patch_tokens(
        self, batch: torch.Tensor, autocast_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Last-layer patch tokens (after the final norm, prefix tokens dropped).

        Arguments:
          batch: normalised images ``[B, 3, H, W]`` with H and W multiples of the patch size,
            on the backbone's device.
          autocast_dtype: optional reduced precision (``torch.float16``/``bfloat16``).

        Returns:
          ``[B, H/p, W/p, D]`` float32 tokens.
        """
        b, _, h, w = batch.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}")
        enabled = autocast_dtype is not None
        with torch.autocast(batch.device.type, dtype=autocast_dtype, enabled=enabled):
            tokens = self.model.forward_features(batch)
        prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        tokens = tokens[:, prefix:, :].float()
        return tokens.reshape(b, h // p, w // p, -1)


def build_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = True,
    random_init: bool = False,
    **timm_kwargs: object,
) -> Backbone:
    """Build a frozen backbone from a preset name.

    Arguments:
      name: a key of ``PRESETS``.
      weights: a local .safetensors/.pth file in timm (or official DINO) layout; when None,
        ``$SELFMENT_WEIGHTS`` is tried, then the hub.
      device: where the model runs.
      allow_download: whether timm may fetch pretrained weights from the hub.
      random_init: build with random weights and load nothing (plumbing tests only).
      timm_kwargs: extra arguments for ``timm.create_model`` (tests use them for tiny models).

    Returns:
      A ``Backbone`` in eval mode with gradients off.
    """
    import timm

    preset = get_preset(name)
    kwargs = {"num_classes": 0, "dynamic_img_size": True, **timm_kwargs}
    path = None if random_init else resolve_weights_path(weights)
    if random_init:
        model = timm.create_model(preset.architecture, pretrained=False, **kwargs)
        sha = "random-init"
    elif path is not None:
        model = timm.create_model(preset.architecture, pretrained=False, **kwargs)
        _load_weights_file(model, path)
        sha = file_sha256(path)
        logger.info("loaded %s weights from %s (sha256 %s)", preset.name, path, sha[:12])
    elif not allow_download:
        raise BackboneError(
            f"no weights for {preset.name}: pass --weights FILE (or set ${WEIGHTS_ENV}), "
            "or allow hub downloads"
        )
    else:
        try:
            model = timm.create_model(preset.timm_id, pretrained=True, **kwargs)
        except Exception as error:  # network, hub and cache errors come in many types
            raise BackboneError(
                f"could not download {preset.timm_id} from the model hub ({error}). "
                f"Offline? Pass a local weights file with --weights FILE "
                f"(or set ${WEIGHTS_ENV})."
            ) from error
        sha = None
    model.eval().requires_grad_(False).to(device)
    return Backbone(model=model, preset=preset, weights_file=path, weights_sha256=sha)

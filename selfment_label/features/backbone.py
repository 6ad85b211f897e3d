"""Self-supervised ViT backbones: a preset -> a frozen timm model -> last-layer patch tokens.

Weights come, in this order, from an explicit file (``--weights``), from the
``SELFMENT_WEIGHTS`` environment variable, or from the model hub through timm when downloads
are allowed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..config import DEFAULT_BACKBONE
from .bf16_cpu import bf16_cpu_model
from .presets import WEIGHTS_ENV, BackboneError, BackbonePreset, get_preset, presets_like

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
    source = "weights" if weights else f"${WEIGHTS_ENV}"
    if path.is_dir():
        raise BackboneError(
            f"the {source} {path} is a folder, not the weights file itself (.safetensors or .pth)",
            remedy="weights",
        )
    if not path.is_file():
        raise BackboneError(
            f"the weights file given by {source} does not exist: {path}", remedy="weights"
        )
    return path


def error_summary(error: BaseException) -> str:
    """The first line of an error's message (torch's readers explain at length over many
    lines), else the error's type; for a pickle torch would not load, what it means."""
    if isinstance(error, pickle.UnpicklingError):
        return "it is not a plain tensor file (torch refuses to unpickle it safely)"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth/.pt checkpoint and unwrap the usual containers."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, zip and pickle readers raise many types
        raise BackboneError(
            f"cannot read the weights file {path}: it is truncated, corrupt, or holds more "
            f"than tensors (only plain tensor checkpoints are loaded; {error_summary(error)})"
        ) from None
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


def _state_shape(state: dict[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """``(patch size, token dimension, blocks)`` of a ViT state dict, when it has a patch
    embedding."""
    proj = state.get("patch_embed.proj.weight")
    if not isinstance(proj, torch.Tensor) or proj.dim() != 4:
        return None
    blocks = {name.split(".")[1] for name in state if name.startswith("blocks.")}
    return int(proj.shape[-1]), int(proj.shape[0]), len(blocks)


class WeightsMismatch(BackboneError):
    """A weights file of another model than the preset asked for; the message names the
    presets the weights look like (``--backbone``), or, for a command whose preset is fixed by
    a run or a head, asks for that preset's weights (``for_fixed_preset``).

    Arguments:
      path: the weights file.
      found: the shape the weights have.
      preset: the preset asked for.
      like: presets with the weights' shape.
    """

    def __init__(self, path: Path, found: str, preset: BackbonePreset, like: list[str]):
        self.path, self.found, self.preset, self.like = path, found, preset, like
        hint = f"they look like {' or '.join(like)}" if like else "no preset has that shape"
        super().__init__(f"{self._what()}; {hint}", remedy="backbone" if like else "weights")

    def _what(self) -> str:
        preset = self.preset
        expected = f"patch {preset.patch_size}, dim {preset.embed_dim}, {preset.depth} blocks"
        return (
            f"{self.path} holds weights of another model ({self.found}), not {preset.name} "
            f"({expected})"
        )

    def for_fixed_preset(self, fixed_by: str) -> BackboneError:
        """The error for a command with no ``--backbone``: ``fixed_by`` (``the head``, ``the
        run``) decides the preset, so the fix is that preset's weights file."""
        return BackboneError(
            f"{self._what()}; {fixed_by} needs the weights of {self.preset.name}", remedy="weights"
        )


def _weights_mismatch(state: dict[str, torch.Tensor], preset: BackbonePreset, path: Path) -> None:
    """Raise why weights do not fit ``preset`` (``WeightsMismatch`` when they are another
    model's, naming the presets they look like)."""
    expected = f"patch {preset.patch_size}, dim {preset.embed_dim}, {preset.depth} blocks"
    shape = _state_shape(state)
    if shape is None:
        raise BackboneError(f"{path} does not hold ViT weights of {preset.name} ({expected})")
    patch, dim, depth = shape
    if (patch, dim, depth) == (preset.patch_size, preset.embed_dim, preset.depth):
        raise BackboneError(
            f"{path} does not hold weights of {preset.name} (same shape, other layers or names)"
        )
    registers = any("reg_token" in name or "register_tokens" in name for name in state)
    like = [
        name
        for name in presets_like(patch, dim, depth)
        if name != preset.name
        and (not name.startswith("dinov2") or name.endswith("-reg") == registers)
    ]
    raise WeightsMismatch(path, f"patch {patch}, dim {dim}, {depth} blocks", preset, like)


def _load_weights_file(model: torch.nn.Module, path: Path, preset: BackbonePreset) -> None:
    """Load timm-layout weights, falling back to timm's converter for official layouts."""
    state = _read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
        return
    except RuntimeError:
        converted = _convert_official_layout(state, model)
    try:
        if converted is None:
            raise RuntimeError("unknown checkpoint layout")
        model.load_state_dict(converted, strict=True)
    except RuntimeError:
        _weights_mismatch(state, preset, path)
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

    The float32 ``model`` is never changed; a reduced-precision form is built from it the
    first time it is asked for (``patch_tokens``) and kept.
    """

    model: torch.nn.Module
    preset: BackbonePreset
    weights_file: Path | None
    weights_sha256: str | None
    _bf16_cpu: torch.nn.Module | None = field(default=None, repr=False, compare=False)

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

    @property
    def depth(self) -> int:
        """Number of transformer blocks (``layers`` index them from 0)."""
        return len(self.model.blocks)

    def check_layers(self, layers: tuple[int, ...] | None) -> None:
        """Raise ``ValueError`` unless ``layers`` are distinct block indices of this model."""
        if layers is None:
            return
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct block indices, not {list(layers)}")
        outside = [layer for layer in layers if not 0 <= layer < self.depth]
        if outside:
            raise ValueError(
                f"layers {outside} are not blocks of {self.preset.name} (0..{self.depth - 1})"
            )

    def _forward(
        self,
        batch: torch.Tensor,
        dtype: torch.dtype | None,
        layers: tuple[int, ...] | None,
        keep_prefix: bool = False,
    ) -> torch.Tensor:
        """``[B, N, D']`` patch tokens in ``dtype``: bf16 on a CPU runs the cast model
        (``bf16_cpu_model``), other reduced precisions autocast the float32 model."""
        if dtype == torch.bfloat16 and batch.device.type == "cpu":
            if self._bf16_cpu is None:
                self._bf16_cpu = bf16_cpu_model(self.model)
            return self._tokens_of(self._bf16_cpu, batch.to(torch.bfloat16), layers, keep_prefix)
        with torch.autocast(batch.device.type, dtype=dtype, enabled=dtype is not None):
            return self._tokens_of(self.model, batch, layers, keep_prefix)

    @staticmethod
    def _tokens_of(
        model: torch.nn.Module,
        batch: torch.Tensor,
        layers: tuple[int, ...] | None,
        keep_prefix: bool = False,
    ) -> torch.Tensor:
        """Last-layer patch tokens of ``model`` (after its prefix tokens when
        ``keep_prefix``), or those of ``layers`` (each after the final norm) concatenated
        along the channels."""
        if layers is None:
            tokens = model.forward_features(batch)
            return (
                tokens
                if keep_prefix
                else tokens[:, int(getattr(model, "num_prefix_tokens", 1)) :, :]
            )
        blocks = model.forward_intermediates(
            batch,
            indices=list(layers),
            norm=True,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        return torch.cat(blocks, dim=-1)

    @torch.inference_mode()
    def patch_tokens(
        self,
        batch: torch.Tensor,
        dtype: torch.dtype | None = None,
        layers: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Last-layer patch tokens (after the final norm, prefix tokens dropped).

        Arguments:
          batch: normalised images ``[B, 3, H, W]`` with H and W multiples of the patch size,
            on the backbone's device.
          dtype: reduced precision of the backbone (``torch.float16``/``bfloat16``), or
            None for float32 (``selfment_label.device.Precision.dtype``).
          layers: block indices (from 0) whose tokens, each after the final norm, are
            concatenated instead (``D * len(layers)`` channels); None: the last layer's.

        Returns:
          ``[B, H/p, W/p, D]`` float32 tokens, whatever the precision.
        """
        grid = self._grid_of(batch)
        self.check_layers(layers)
        return self._forward(batch, dtype, layers).float().reshape(*grid, -1)

    @torch.inference_mode()
    def patch_and_class_tokens(
        self, batch: torch.Tensor, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-layer ``patch_tokens`` and the class token of the same forward pass.

        The class token (the first prefix token, after the final norm) is the image's
        global embedding, which self-supervised ViTs align with the main object; the single
        segmenter uses it to tell which side of a cut is the object.

        Returns:
          ``([B, H/p, W/p, D], [B, D])`` float32 tokens, whatever the precision.
        """
        grid = self._grid_of(batch)
        tokens = self._forward(batch, dtype, None, keep_prefix=True).float()
        prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        return tokens[:, prefix:, :].reshape(*grid, -1), tokens[:, 0, :]

    def _grid_of(self, batch: torch.Tensor) -> tuple[int, int, int]:
        """``(B, rows, cols)`` of a ``[B, 3, H, W]`` batch; ``ValueError`` unless ``H`` and
        ``W`` are multiples of the patch size."""
        b, _, h, w = batch.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}")
        return b, h // p, w // p


HUB_PROBE_SECONDS = 3.0


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the model hub's host answers a TCP connection within ``timeout`` seconds."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Put huggingface_hub in offline mode for one call (cache only, no retries), then back."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _from_hub(preset: BackbonePreset, kwargs: dict[str, object]) -> torch.nn.Module:
    """The pretrained model from the hub, or from its local cache when the hub is unreachable.

    The hub is probed first (a few seconds at most): offline, only the local cache is tried,
    so there is no minute of retries before the error.
    """
    import timm

    offline = not hub_reachable()
    try:
        with _hub_offline(offline):
            return timm.create_model(preset.timm_id, pretrained=True, **kwargs)
    except Exception as error:  # network, hub and cache errors come in many types
        if offline:
            raise BackboneError(
                f"the model hub is unreachable (offline?) and {preset.timm_id} is not in the "
                "local hub cache",
                remedy="weights",
            ) from None
        raise BackboneError(
            f"could not download {preset.timm_id} from the model hub ({error})", remedy="weights"
        ) from None


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
        _load_weights_file(model, path, preset)
        sha = file_sha256(path)
        logger.info("loaded %s weights from %s (sha256 %s)", preset.name, path, sha[:12])
    elif not allow_download:
        raise BackboneError(
            f"no weights for {preset.name}: no weights file, and hub downloads are not allowed",
            remedy="weights",
        )
    else:
        model = _from_hub(preset, kwargs)
        sha = None
    model.eval().requires_grad_(False).to(device)
    return Backbone(model=model, preset=preset, weights_file=path, weights_sha256=sha)

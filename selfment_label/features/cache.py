"""On-disk cache of backbone patch tokens, so a head trains without re-running the backbone.

A cache folder holds one sub-folder per feature setting (backbone preset, timm id, weights
sha256, resolution, patch size, backbone precision); its name is a hash of those settings and
it carries them in ``settings.json``. Inside, one file per image is named from the image's
relative path and the sha256 of its bytes, and repeats the settings, the path and the hash,
which are checked on every read: features made with other settings, or of another file of
the same name, are never returned. Tokens are stored as float16 (half the disk, far below
the head's resolution of differences). Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path, atomic_write_json
from ..config import RunConfig
from ..data.batching import batches_by_grid, lookahead, prefetch, stack_pixels
from ..data.images import DecodedImage, prepare_image
from ..device import PRECISIONS
from ..errors import SelfmentError
from .backbone import Backbone, error_summary, file_sha256

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
SETTINGS_NAME = "settings.json"
HASH_CHARS = 24

FeatureProgress = Callable[[int, int], None]


class CacheError(SelfmentError, RuntimeError):
    """The cache cannot serve the features asked for (missing image, foreign settings)."""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheSettings:
    """Everything that decides a patch token, apart from the image itself.

    Arguments:
      backbone: preset name.
      timm_id: timm model id.
      weights_sha256: sha256 of the weights file (None for hub weights).
      resolution: pixels on the long side fed to the backbone.
      patch_size: side of a patch in pixels.
      precision: the backbone precision used (``fp32``, ``fp16``, ``bf16``; never ``auto``):
        features of another precision are other features.
      layers: block indices whose tokens are concatenated (``Backbone.patch_tokens``); None
        for the last layer's (the key of such a cache is the one it had before ``layers``).
    """

    backbone: str
    timm_id: str
    weights_sha256: str | None
    resolution: int
    patch_size: int
    precision: str = "fp32"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"cache precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"
            )

    @classmethod
    def for_backbone(
        cls,
        backbone: Backbone,
        resolution: int,
        precision: str = "fp32",
        layers: tuple[int, ...] | None = None,
    ) -> CacheSettings:
        """The settings of ``backbone`` run at ``resolution`` in ``precision`` (``layers``:
        the blocks read, None for the last)."""
        return cls(
            backbone=backbone.preset.name,
            timm_id=backbone.preset.timm_id,
            weights_sha256=backbone.weights_sha256,
            resolution=int(resolution),
            patch_size=backbone.patch_size,
            precision=precision,
            layers=layers,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain dict with the cache format version (what is stored and compared); ``layers``
        only when chosen, so last-layer caches keep their key."""
        values = asdict(self)
        layers = values.pop("layers")
        chosen = {"layers": list(layers)} if layers is not None else {}
        return {"format": CACHE_FORMAT, **values, **chosen}

    @property
    def key(self) -> str:
        """Name of the settings' sub-folder."""
        return _digest(json.dumps(self.as_dict(), sort_keys=True))[:HASH_CHARS]


@dataclass
class CachedTokens:
    """Patch tokens of one image read back from the cache.

    Arguments:
      file_name: image path relative to its input folder.
      width, height: the image's displayed size.
      tokens: ``[rows, cols, D]`` float32 tokens.
    """

    file_name: str
    width: int
    height: int
    tokens: torch.Tensor


class FeatureCache:
    """Patch tokens of images for one ``CacheSettings``, under ``root``.

    Arguments:
      root: the cache folder (shared by all settings; each gets its own sub-folder).
      settings: the settings whose features this object reads and writes.
    """

    def __init__(self, root: str | Path, settings: CacheSettings):
        self.root = Path(root)
        self.settings = settings
        self.folder = self.root / settings.key
        self._expected = settings.as_dict()

    def entry_path(self, file_name: str, content_sha256: str) -> Path:
        """File holding the tokens of ``file_name`` whose bytes hash to ``content_sha256``."""
        return self.folder / f"{self._name_key(file_name)}-{content_sha256[:HASH_CHARS]}.pt"

    @staticmethod
    def _name_key(file_name: str) -> str:
        return _digest(file_name)[:HASH_CHARS]

    def load(self, path: Path, file_name: str | None = None) -> CachedTokens | None:
        """Read one entry; None (with a warning) when it was made for other settings or files.

        Arguments:
          path: an entry file of this cache.
          file_name: the image it must belong to (not checked when None).
        """
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as error:  # a torn or foreign file: recompute rather than fail
            logger.warning(
                "ignoring unreadable cache entry %s (truncated, corrupt or foreign: %s)",
                path,
                error_summary(error),
            )
            return None
        if payload.get("settings") != self._expected:
            logger.warning("ignoring cache entry %s made with other settings", path)
            return None
        if file_name is not None and payload.get("file_name") != file_name:
            logger.warning("ignoring cache entry %s of another file", path)
            return None
        return CachedTokens(
            file_name=payload["file_name"],
            width=int(payload["width"]),
            height=int(payload["height"]),
            tokens=payload["tokens"].float(),
        )

    def lookup(self, file_name: str, content_sha256: str) -> Path | None:
        """The entry of an image with known content, if cached."""
        path = self.entry_path(file_name, content_sha256)
        return path if path.is_file() else None

    def lookup_by_name(self, file_name: str) -> Path | None:
        """The entry of an image whose file is gone: found by name alone when unambiguous."""
        found = sorted(self.folder.glob(f"{self._name_key(file_name)}-*.pt"))
        if len(found) > 1:
            raise CacheError(
                f"{file_name} is not in the input folder and the cache holds {len(found)} "
                "versions of it; restore the image or clear the cache"
            )
        return found[0] if found else None

    def save(
        self, file_name: str, content_sha256: str, width: int, height: int, tokens: torch.Tensor
    ) -> Path:
        """Store the ``[rows, cols, D]`` tokens of one image atomically; return the entry."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / SETTINGS_NAME).exists():
            atomic_write_json(self.folder / SETTINGS_NAME, self._expected)
        path = self.entry_path(file_name, content_sha256)
        payload = {
            "settings": self._expected,
            "file_name": file_name,
            "content_sha256": content_sha256,
            "width": int(width),
            "height": int(height),
            "tokens": tokens.detach().to("cpu", torch.float16).contiguous(),
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return path


def ensure_features(
    cache: FeatureCache,
    input_dir: Path,
    file_names: list[str],
    backbone_factory: Callable[[], Backbone],
    *,
    batch_size: int = RunConfig.batch_size,
    workers: int = RunConfig.workers,
    progress: FeatureProgress | None = None,
) -> dict[str, Path]:
    """Make sure every image has cached tokens; compute only the missing ones.

    The backbone is built (through ``backbone_factory``) only when something is missing, so
    training from a complete cache needs neither the backbone nor its weights. An image whose
    file is gone is served from the cache by name when it was cached before. An entry that
    cannot be read (torn, corrupt, foreign) is computed again.

    Arguments:
      cache: the cache to fill.
      input_dir: folder the file names are relative to.
      file_names: images wanted.
      backbone_factory: builds the backbone; must match ``cache.settings``.
      batch_size: images per backbone batch.
      workers: decoding threads.
      progress: called with ``(done, total)`` as images are hashed or computed.

    Returns:
      File name -> cache entry, for every image that could be served (images that cannot
      be decoded are left out with a warning).

    Raises:
      CacheError: an image is missing and not cached, or the backbone does not match.
    """
    entries: dict[str, Path] = {}
    missing: dict[str, str] = {}
    for name in file_names:
        image = input_dir / name
        if image.is_file():
            sha = file_sha256(image)
            hit = cache.lookup(name, sha)
            if hit is not None and cache.load(hit, name) is None:
                hit = None  # torn or foreign entry (warned): computed again, then replaced
            if hit is None:
                missing[name] = sha
            else:
                entries[name] = hit
        else:
            hit = cache.lookup_by_name(name)
            if hit is None:
                raise CacheError(f"{image} does not exist and its features are not cached")
            if cache.load(hit, name) is None:
                raise CacheError(
                    f"{image} does not exist and its cached features cannot be read; "
                    "restore the image"
                )
            logger.info("%s is gone; using its cached features", name)
            entries[name] = hit
        if progress:
            progress(len(entries), len(file_names))
    if not missing:
        return entries
    backbone = backbone_factory()
    settings = cache.settings
    actual = CacheSettings.for_backbone(
        backbone, settings.resolution, settings.precision, settings.layers
    )
    if actual != cache.settings:
        raise CacheError(
            f"the backbone built for feature extraction ({actual}) does not match the "
            f"settings the features are wanted for ({cache.settings})"
        )
    mean, std = backbone.mean_std

    def decode(name: str) -> DecodedImage:
        return prepare_image(input_dir, name, settings.resolution, settings.patch_size, mean, std)

    depth = lookahead(batch_size)
    stream = prefetch(list(missing), decode, workers=workers, depth=depth)
    for batch, failures in batches_by_grid(stream, batch_size, window=depth):
        for name, error in failures:
            logger.warning("no features for %s: %s", name, error)
        if not batch:
            continue
        pixels = stack_pixels(batch, backbone.device)
        tokens = backbone.patch_tokens(pixels, PRECISIONS[settings.precision], settings.layers)
        for item, item_tokens in zip(batch, tokens, strict=True):
            name = item.file_name
            entries[name] = cache.save(name, missing[name], item.width, item.height, item_tokens)
            if progress:
                progress(len(entries), len(file_names))
    return entries

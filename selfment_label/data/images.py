"""Finding and decoding images safely, resized to the backbone's patch grid.

Decoding honours EXIF orientation (masks match the image as displayed), converts every
mode (CMYK, 16-bit, grayscale, palette, alpha) to RGB, refuses decompression bombs and
reports every failure as an ``ImageSkip`` with a human reason instead of raising.
"""

from __future__ import annotations

import io
import logging
import math
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import DEFAULT_MAX_PIXELS
from ..zoom import crop_views

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
MIN_SIDE = 2
MAX_GRID_ASPECT = 2
KEPT_ASPECT = 3
THIN_EXTRA_GRIDS = ((KEPT_ASPECT, 1.0), (KEPT_ASPECT, 1.5))
"""More grids for an image thinner than ``KEPT_ASPECT``:1, as ``(grid aspect, long side in
units of resolution / patch size)``: 3:1 at the usual long side and 3:1 at 1.5 times it (at
448 px: 11 x 32 and 16 x 48, next to ``grid_for``'s 16 x 32). No single grid suits every
squashed image (docs/quality-report.md, "Thin images: more than one grid")."""
ORIENTATION_TAG = 0x0112
ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})
TOO_LARGE = "too large"
"""How the skip reason of an image above ``max_pixels`` begins."""


_PIL_LIMIT_LOCK = threading.Lock()


class ImageSkip(Exception):
    """An image that cannot be labelled; ``str(error)`` is the reason shown to the user."""


def find_images(
    root: str | Path,
    *,
    skip_folder: Callable[[Path], bool] | None = None,
    report: bool = False,
) -> list[str]:
    """Relative POSIX paths of all images under ``root``, recursively, sorted.

    Linked folders are followed; a folder reached again (a link loop, or two links to one
    folder) is searched once, under its first path in sorted order.

    Arguments:
      root: the input folder.
      skip_folder: called with each sub-folder; a folder for which it returns True is not
        searched (the pipeline skips its own run folder and any other run folder with it).
      report: log one warning naming the skipped folders, one naming the folders reached
        again, and one counting the files left out for their extension. Folders that cannot
        be read (permission denied) are left out with one warning naming them, always.

    Returns:
      Paths relative to ``root`` (``sub/dir/name.jpg``); hidden files and folders are ignored.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"input folder does not exist: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"input is not a folder: {root}")
    search = _FolderSearch(root, skip_folder)
    search.run()
    if report and search.skipped:
        logger.warning(
            "not searching %s: selfment-label run folder(s), not input images",
            ", ".join(search.skipped),
        )
    if report and search.repeated:
        logger.warning(
            "not searching %s again: linked folder(s) already searched (a link loop, or two "
            "links to one folder)",
            ", ".join(sorted(search.repeated)),
        )
    if search.unreadable:
        logger.warning(
            "not searching %d folder(s) that cannot be read: %s",
            len(search.unreadable),
            ", ".join(sorted(search.unreadable)),
        )
    if report:
        report_unsupported(search.unsupported)
    return sorted(search.found)


@dataclass
class _FolderSearch:
    """One walk of an input folder (links followed, each folder once) and what it met."""

    root: Path
    skip_folder: Callable[[Path], bool] | None
    found: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    unsupported: Counter[str] = field(default_factory=Counter)

    def _relative(self, path: Path | str) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def _unreadable(self, error: OSError) -> None:
        where = self._relative(error.filename) if error.filename else "."
        self.unreadable.append(f"{where} ({error.strerror or error})")

    def run(self) -> None:
        """Walk the folder, filling ``found`` and the lists of folders left out."""
        seen: set[tuple[int, int]] = set()
        for folder, subfolders, files in os.walk(
            self.root, onerror=self._unreadable, followlinks=True
        ):
            here = Path(folder)
            status = here.stat()
            if (status.st_dev, status.st_ino) in seen:
                subfolders[:] = []
                self.repeated.append(self._relative(here))
                continue
            seen.add((status.st_dev, status.st_ino))
            subfolders[:] = [sub for sub in sorted(subfolders) if self._searched(here / sub)]
            for name in files:
                if not name.startswith(".") and is_image_name(name, self.unsupported):
                    self.found.append(self._relative(here / name))

    def _searched(self, folder: Path) -> bool:
        """Whether a sub-folder is searched (not hidden, not skipped, readable)."""
        if folder.name.startswith("."):
            return False
        try:
            skip = self.skip_folder is not None and self.skip_folder(folder)
        except OSError as error:
            self.unreadable.append(f"{self._relative(folder)} ({error.strerror or error})")
            return False
        if skip:
            self.skipped.append(self._relative(folder))
        return not skip


def is_image_name(name: str, unsupported: Counter[str] | None = None) -> bool:
    """Whether a file name has an image extension; other extensions are counted in
    ``unsupported`` when given."""
    suffix = Path(name).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return True
    if unsupported is not None:
        unsupported[suffix or "(no extension)"] += 1
    return False


def report_unsupported(unsupported: Counter[str]) -> None:
    """Log one warning counting the files left out for their extension (none: nothing)."""
    if unsupported:
        kinds = " ".join(sorted(unsupported))
        logger.warning(
            "%d files with unsupported extensions ignored: %s", sum(unsupported.values()), kinds
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _open(source: Path | io.BytesIO) -> Image.Image:
    """``Image.open`` without PIL's own bomb check, which would refuse (or warn about) an image
    by PIL's limit rather than ``--max-pixels``: the caller checks the size ``open`` read from
    the header before anything is decoded. The process's limit is lifted for this one call
    (under a lock) and put back at once; PIL still checks what it decodes later (frames, tiles).
    """
    with _PIL_LIMIT_LOCK:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _check_file(path: Path) -> None:
    """Refuse, as an ``ImageSkip``, what is not a readable, non-empty regular file (reading a
    FIFO would block)."""
    try:
        status = path.stat()
    except PermissionError:
        raise ImageSkip("permission denied") from None
    except OSError as error:
        raise ImageSkip(f"cannot read: {error}") from None
    if not stat.S_ISREG(status.st_mode):
        raise ImageSkip("not a regular file")
    if status.st_size == 0:
        raise ImageSkip("empty file (0 bytes)")


def read_image_file(path: str | Path) -> bytes:
    """The bytes of an image file, after the checks ``load_image`` makes.

    Raises:
      ImageSkip: with the reason (not a regular file, empty, unreadable).
    """
    path = Path(path)
    _check_file(path)
    try:
        return path.read_bytes()
    except PermissionError:
        raise ImageSkip("permission denied") from None
    except OSError as error:
        raise ImageSkip(f"cannot read: {error}") from None


def load_image(
    path: str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode one image as displayed (EXIF-rotated) in RGB.

    Arguments:
      path: the image file.
      max_pixels: larger images are refused as possible decompression bombs.
      draft_size: when given, JPEGs are decoded at a reduced scale whose sides stay at least
        this large (much faster for big photos); the returned size is still the full one.

    Returns:
      ``(RGB image, (width, height) of the full image as displayed)``.

    Raises:
      ImageSkip: with the reason, for any file that cannot be used.
    """
    path = Path(path)
    _check_file(path)
    return _decode(path, max_pixels, draft_size)


def decode_image_bytes(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """``load_image`` for a file's bytes (read from object storage, or by a Ray task).

    Raises:
      ImageSkip: with the reason, for any bytes that cannot be used.
    """
    if not data:
        raise ImageSkip("empty file (0 bytes)")
    return _decode(io.BytesIO(data), max_pixels, draft_size)


def _decode(
    source: Path | io.BytesIO, max_pixels: int, draft_size: int | None
) -> tuple[Image.Image, tuple[int, int]]:
    try:
        with _open(source) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise ImageSkip(
                    f"{TOO_LARGE}: {width}x{height} = {width * height:,} pixels exceeds "
                    f"the limit of {max_pixels:,} (max_pixels)"
                )
            if opened.getexif().get(ORIENTATION_TAG, 1) in ROTATED_ORIENTATIONS:
                width, height = height, width
            if draft_size and opened.format == "JPEG":
                opened.draft("RGB", (draft_size, draft_size))
            opened.load()
            image = _to_rgb(ImageOps.exif_transpose(opened))
    except ImageSkip:
        raise
    except PermissionError:
        raise ImageSkip("permission denied") from None
    except UnidentifiedImageError:
        raise ImageSkip("not an image (unrecognised or corrupt file)") from None
    except Image.DecompressionBombError as error:
        raise ImageSkip(
            f"a frame or tile is too large for PIL's decompression bomb guard: {error}"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise ImageSkip(f"cannot decode: {error}") from None
    if min(width, height) < MIN_SIDE:
        raise ImageSkip(f"too small: {width}x{height} pixels")
    return image, (width, height)


def grid_for(width: int, height: int, resolution: int, patch_size: int) -> tuple[int, int]:
    """Patch grid ``(rows, cols)`` for an image resized so its long side is ``resolution``.

    Each side is rounded to the nearest multiple of the patch size, with at least two patches
    per side (tiny images are upsampled). Images up to ``KEPT_ASPECT``:1 keep their aspect
    ratio; a thinner image is stretched across its short side to ``MAX_GRID_ASPECT``:1. A
    strip one or two patches high cannot hold an object (a 1600 x 120 photo at 448 px was a
    2 x 32 grid), and a long grid of squashed content splits poorly: on ecssd-dev images
    squeezed to 8:1 and 13:1 a 16 x 32 grid labels them better than an 8 x 32 one, and both
    better than an 8-patch short side with the aspect ratio kept. A wide photo is not
    squashed content: stretching ecssd-dev 0187 (2.9:1) to 2:1 lowered its IoU from 0.525
    to 0.499 (docs/quality-report.md).
    """
    side = resolution / patch_size
    aspect = max(width, height) / min(width, height)
    grid_aspect = MAX_GRID_ASPECT if aspect > KEPT_ASPECT else aspect
    long_count = max(2, round(side))
    short_count = max(2, round(side / grid_aspect))
    return (short_count, long_count) if height <= width else (long_count, short_count)


def thin_grids(width: int, height: int, resolution: int, patch_size: int) -> list[tuple[int, int]]:
    """The extra patch grids ``(rows, cols)`` of an image thinner than ``KEPT_ASPECT``:1
    (``THIN_EXTRA_GRIDS``); none for any other image."""
    if max(width, height) / min(width, height) <= KEPT_ASPECT:
        return []
    side = resolution / patch_size
    grids = []
    for grid_aspect, scale in THIN_EXTRA_GRIDS:
        long_count = max(2, round(side * scale))
        short_count = max(2, round(side * scale / grid_aspect))
        grids.append((short_count, long_count) if height <= width else (long_count, short_count))
    return grids


@dataclass
class DecodedImage:
    """One decoded, resized and normalised image ready for the backbone.

    Arguments:
      file_name: path relative to the input folder.
      width, height: size of the image as displayed (after EXIF rotation).
      pixels: ``[3, rows*p, cols*p]`` float32 normalised tensor data (numpy).
      grid: ``(rows, cols)`` patch grid.
      decode_seconds: time spent decoding and resizing.
      guide: ``[h, w, 3]`` uint8 RGB image that guides the edge refinement of the masks
        (``selfment_label.refine``), or None when no refinement was asked for. It is the
        image as decoded (JPEGs at their reduced draft scale), shrunk to ``guide_side``.
      zoom_pixels: ``[4, 3, rows*p, cols*p]`` float32 normalised corner crops
        (``zoom.crop_views``, on the same grid as ``pixels``), or None without zoom.
      thin_views: the image on each of its ``thin_grids`` (``[3, rows*p, cols*p]`` float32
        normalised pixels); empty unless asked for (``thin``) and the image is thinner than
        ``KEPT_ASPECT``:1.
    """

    file_name: str
    width: int
    height: int
    pixels: np.ndarray
    grid: tuple[int, int]
    decode_seconds: float
    guide: np.ndarray | None = None
    zoom_pixels: np.ndarray | None = None
    thin_views: list[np.ndarray] = field(default_factory=list)


def draft_side(resolution: int, zoom: float | None = None) -> int:
    """The smallest long side a JPEG may be decoded at (its draft scale): ``resolution``, or
    ``resolution / zoom`` so that every zoomed crop keeps its full ``resolution``."""
    return resolution if zoom is None else math.ceil(resolution / zoom)


class ImageReader(Protocol):
    """Where image bytes come from when they are not in a local folder (object storage)."""

    def read(self, file_name: str) -> bytes:
        """The bytes of ``file_name``; raises ``ImageSkip`` with the reason when unreadable."""
        ...


def prepare_image(
    root: str | Path | ImageReader,
    file_name: str,
    resolution: int,
    patch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    guide_side: int | None = None,
    zoom: float | None = None,
    thin: bool = False,
) -> DecodedImage:
    """Decode, resize to the patch grid and normalise one image (runs in a worker thread).

    Arguments:
      root: the local folder ``file_name`` is relative to, or a reader of its bytes (an
        object storage source).
      file_name: the image, relative to ``root``.
      resolution, patch_size, mean, std: as ``decoded_image``.
      max_pixels: larger images are skipped as decompression bombs.
      guide_side: also keep the RGB image, its long side at most this many pixels, to
        guide the edge refinement (None: no guide).
      zoom: also make its four corner crops of this fraction of each side (None: none).
      thin: also resize an image thinner than ``KEPT_ASPECT``:1 to its ``thin_grids``
        (``DecodedImage.thin_views``: only a labeller that picks a grid uses them).

    Raises:
      ImageSkip: with the reason, for any file that cannot be used.
    """
    start = time.perf_counter()
    draft = draft_side(resolution, zoom)
    if isinstance(root, str | Path):
        image, size = load_image(Path(root) / file_name, max_pixels, draft_size=draft)
    else:
        image, size = decode_image_bytes(root.read(file_name), max_pixels, draft_size=draft)
    return decoded_image(
        image, file_name, size, resolution, patch_size, mean, std, start, guide_side, zoom, thin
    )


def _guide_image(image: Image.Image, side: int) -> np.ndarray:
    """``image`` as a uint8 ``[h, w, 3]`` array, shrunk so its long side is at most ``side``."""
    scale = side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return np.array(image, dtype=np.uint8)


def decoded_image(
    image: Image.Image,
    file_name: str,
    size: tuple[int, int],
    resolution: int,
    patch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    start: float | None = None,
    guide_side: int | None = None,
    zoom: float | None = None,
    thin: bool = False,
) -> DecodedImage:
    """Resize an RGB image to its patch grid and normalise it.

    Arguments:
      image: the RGB image (possibly decoded at a reduced draft scale).
      file_name: its name, carried along.
      size: ``(width, height)`` of the full image as displayed.
      resolution: pixels on the long side after resizing.
      patch_size: the backbone's patch size.
      mean, std: the backbone's normalisation.
      start: ``time.perf_counter()`` when decoding began (decode time counted from there).
      guide_side: also keep the RGB image as the refinement guide, shrunk so its long side
        is at most this many pixels (None: no guide).
      zoom: also make its four corner crops of this fraction of each side, each resized to
        the image's own patch grid (``zoom.crop_views``; None: none).
      thin: also resize an image thinner than ``KEPT_ASPECT``:1 to each of its
        ``thin_grids`` (``DecodedImage.thin_views``).
    """
    start = time.perf_counter() if start is None else start
    width, height = size
    rows, cols = grid_for(width, height, resolution, patch_size)
    view_size = (cols * patch_size, rows * patch_size)
    resized = image.resize(view_size, Image.Resampling.BICUBIC)
    zoom_pixels = None
    if zoom is not None:
        crops = crop_views(image, size, zoom, view_size)
        zoom_pixels = np.stack([_normalised(crop, mean, std) for crop in crops])
    guide = None if guide_side is None else _guide_image(image, guide_side)
    thin_views = []
    for thin_rows, thin_cols in thin_grids(width, height, resolution, patch_size) if thin else []:
        thin_size = (thin_cols * patch_size, thin_rows * patch_size)
        thin_views.append(_normalised(image.resize(thin_size, Image.Resampling.BICUBIC), mean, std))
    return DecodedImage(
        file_name=file_name,
        width=width,
        height=height,
        pixels=_normalised(resized, mean, std),
        grid=(rows, cols),
        decode_seconds=time.perf_counter() - start,
        guide=guide,
        zoom_pixels=zoom_pixels,
        thin_views=thin_views,
    )


def _normalised(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``[3, H, W]`` float32 pixels of an RGB image, normalised by ``mean`` and ``std``."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))

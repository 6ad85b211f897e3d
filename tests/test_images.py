"""Decoding every kind of bad or unusual image file: labelled correctly or skipped with a reason."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfment_label.data.batching import prefetch
from selfment_label.data.images import ImageSkip, find_images, grid_for, load_image


def _photo(size=(64, 48)) -> Image.Image:
    """A small RGB image with a bright square on a dark background."""
    array = np.full((size[1], size[0], 3), 30, dtype=np.uint8)
    array[10:30, 20:44] = (220, 200, 40)
    return Image.fromarray(array)


def test_find_images_recurses_filters_and_sorts(tmp_path: Path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for rel in ["z.JPG", "a.png", "b/c.webp", "b/a.png", "notes.txt", ".hidden/x.jpg", "d.tiff"]:
        (tmp_path / rel).write_bytes(b"x")
    assert find_images(tmp_path) == ["a.png", "b/a.png", "b/c.webp", "d.tiff", "z.JPG"]


def test_find_images_errors_on_missing_folder(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "nope")


@pytest.mark.parametrize(
    "mode",
    ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"],
)
def test_every_mode_decodes_to_rgb(tmp_path: Path, mode: str):
    source = _photo()
    if mode == "I;16":
        gray = np.asarray(source.convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(gray)
        assert image.mode.startswith("I;16")
        path = tmp_path / "x.png"
    else:
        image = source.convert(mode)
        path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    image.save(path)
    decoded, size = load_image(path)
    assert decoded.mode == "RGB"
    assert size == (64, 48) == decoded.size
    # the bright square stays brighter than the background whatever the mode
    array = np.asarray(decoded.convert("L"), dtype=float)
    assert array[15:25, 25:40].mean() > array[40:, :10].mean() + 50 or mode == "CMYK"


def test_exif_rotation_gives_displayed_size_and_content(tmp_path: Path):
    upright = _photo((64, 48))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera would store
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    decoded, size = load_image(path)
    assert size == decoded.size == (64, 48)
    diff = np.abs(np.asarray(decoded, dtype=float) - np.asarray(upright, dtype=float)).mean()
    assert diff < 8


def test_jpeg_draft_decodes_small_but_reports_full_size(tmp_path: Path):
    path = tmp_path / "big.jpg"
    _photo((2000, 1500)).save(path, quality=90)
    decoded, size = load_image(path, draft_size=448)
    assert size == (2000, 1500)
    assert 448 <= min(decoded.size) < 1500


@pytest.mark.parametrize(
    ("name", "payload", "reason"),
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is not an image at all\n" * 20, "not an image"),
        ("garbage.png", os.urandom(4096), "not an image"),
    ],
)
def test_unusable_files_are_skipped_with_reason(tmp_path: Path, name, payload, reason):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(ImageSkip, match=reason):
        load_image(path)


def test_truncated_jpeg_is_skipped(tmp_path: Path):
    path = tmp_path / "cut.jpg"
    _photo((256, 256)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageSkip, match="cannot decode|truncated"):
        load_image(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # 400 M pixels, a few KB on disk
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ImageSkip, match="too large"):
        load_image(path)


def test_bomb_is_refused_by_max_pixels_not_pil_limit_and_without_warnings(tmp_path: Path, recwarn):
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # 400 M pixels: above PIL's own error limit
    with pytest.raises(ImageSkip) as caught:
        load_image(path)
    assert str(caught.value) == (
        "too large: 20000x20000 = 400,000,000 pixels exceeds the limit of 120,000,000 (max_pixels)"
    )
    # between PIL's warning and error limits, decoded in threads as a run does: no warning
    Image.new("1", (10000, 10000)).save(tmp_path / "big.png")
    jobs = [tmp_path / "big.png"] * 8
    results = list(prefetch(jobs, lambda p: load_image(p, max_pixels=50_000_000), workers=4))
    assert all(isinstance(error, ImageSkip) for _, error in results)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_permission_denied_is_skipped(tmp_path: Path, monkeypatch):
    path = tmp_path / "locked.png"
    _photo().save(path)
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads anything: make the open fail as it would for a normal user

        def deny(*_args, **_kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(Image, "open", deny)
    with pytest.raises(ImageSkip, match="permission denied"):
        load_image(path)


def test_tiny_images_get_a_usable_grid():
    assert grid_for(5, 5, 448, 14) == (32, 32)
    # a thin image keeps a short side of 8 patches, its long side capped at 4 x resolution
    assert grid_for(1000, 3, 448, 14) == (8, 128)


def test_prefetch_keeps_order_and_returns_errors():
    def work(x: int) -> int:
        if x == 3:
            raise ValueError("three")
        return x * 10

    results = list(prefetch(range(6), work, workers=2, depth=2))
    assert [item for item, _ in results] == list(range(6))
    assert [r for _, r in results if not isinstance(r, BaseException)] == [0, 10, 20, 40, 50]
    assert isinstance(results[3][1], ValueError)


def test_find_images_skips_folders_and_reports_unsupported_extensions(tmp_path: Path, caplog):
    for rel in ["a.png", "run/scores/a.png.png", "sub/b.jpg", "anim.gif", "clip.GIF", "x.heic"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    with caplog.at_level("WARNING"):
        found = find_images(tmp_path, skip_folder=lambda f: f.name == "run", report=True)
    assert found == ["a.png", "sub/b.jpg"]
    messages = [r.getMessage() for r in caplog.records]
    assert "3 files with unsupported extensions ignored: .gif .heic" in messages
    assert any("not searching run" in m for m in messages)
    caplog.clear()
    find_images(tmp_path)
    assert not caplog.records


def test_linked_folders_are_searched_once_and_loops_end(tmp_path: Path, caplog):
    root, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    for rel in ["images/a.png", "elsewhere/b.png", "elsewhere/deep/c.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "linked-again").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(root, target_is_directory=True)
    with caplog.at_level("WARNING"):
        found = find_images(root, report=True)
    assert found == ["a.png", "linked/b.png", "linked/deep/c.jpg"]
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "not searching linked-again, linked/loop again" in message


def test_unreadable_folders_are_left_out_with_one_warning(tmp_path: Path, monkeypatch, caplog):
    """What the kernel does for a user without permission (the tests may run as root): a
    folder that cannot be listed (mode 311), and one whose entries cannot be checked (000)."""
    for rel in ["a.png", "listless/b.png", "closed/c.png", "sub/d.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "listless":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    def skip_folder(folder: Path) -> bool:
        if folder.name == "closed":
            raise PermissionError(errno.EACCES, "Permission denied", str(folder / ".lock"))
        return False

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level("WARNING"):
        found = find_images(tmp_path, skip_folder=skip_folder)
    assert found == ["a.png", "sub/d.png"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "not searching 2 folder(s) that cannot be read: closed (Permission denied), "
        "listless (Permission denied)"
    ]


def test_fifo_is_skipped_as_not_a_regular_file(tmp_path: Path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageSkip, match="not a regular file"):
        load_image(fifo)


def test_max_pixels_not_pil_limit_decides_and_pil_limit_is_restored(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 80), "red").save(path)
    image, size = load_image(path, max_pixels=1_000_000)
    assert size == (100, 80)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(ImageSkip, match=r"\(max_pixels\)"):
        load_image(path, max_pixels=5000)
    assert Image.MAX_IMAGE_PIXELS == 1000

"""Atomic file writes: write beside the target, then rename over it.

A reader never sees a half-written file, and a crash leaves the previous version (or
nothing) in place, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_PREFIX_BYTES = 64
"""Bytes of the target's name kept in a temporary file's name (file names are limited to 255
bytes, and the temporary name adds a dot, a random part and ``.tmp``)."""


def truncate_name(name: str, max_bytes: int) -> str:
    """``name`` cut to at most ``max_bytes`` bytes of its file-system encoding, on a character
    boundary."""
    return os.fsencode(name)[:max_bytes].decode("utf-8", "ignore")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; it replaces ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched. Writers
    that pick a format from the file name (PIL) must be told the format explicitly. The file
    gets the usual mode of a new file (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{truncate_name(path.name, TEMP_PREFIX_BYTES)}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def umask() -> int:
    """The process umask, read without changing it where the system tells it (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (fsync before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")

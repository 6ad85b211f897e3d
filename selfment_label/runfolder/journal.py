"""The run folder's durable state: an exclusive lock and an append-only journal.

The journal (``journal.jsonl``) holds one header line with the options that decide the results
and the input the run labels (a run folder belongs to one input: another input is refused, see
``Journal``), then one line per finished image (its annotations, or the reason it was skipped).
Lines are flushed as they are made, so a run killed at any point loses at most the image in
flight; a torn last line is cut off when the journal is reopened, and a corrupt line in the
middle is skipped with a warning (the records after it are kept). Each image's record holds its
content key (file size and modification time in ns): an image changed since it was labelled is
labelled again, and skipped images are retried on every resume. The lock is an ``flock`` on
``.lock``: the kernel releases it when the process dies, so a killed run never leaves it stuck.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..errors import SelfmentError
from .layout import JOURNAL_NAME, LOCK_NAME, RUN_NAME

logger = logging.getLogger(__name__)


class RunConflict(SelfmentError, RuntimeError):
    """The output folder is busy or holds a run made with different options."""


class RunLock:
    """Exclusive, non-blocking lock on a run folder (released on exit or process death)."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self._holder()
            raise RunConflict(
                f"another selfment-label process{holder} is writing to {self.path.parent}",
                remedy="out_dir",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid else ""

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _run_json_input(folder: Path) -> str | None:
    """The input recorded in a run folder's ``run.json``, or None."""
    try:
        recorded = json.loads((folder / RUN_NAME).read_text(encoding="utf-8")).get("input_dir")
    except (OSError, ValueError, AttributeError):
        return None
    return str(recorded) if recorded else None


def _is_record(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and entry.get("kind") in ("header", "image", "skip")
        and (entry["kind"] == "header" or isinstance(entry.get("file_name"), str))
    )


def _valid_lines(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], int, int]:
    """Parsed journal lines with their byte offsets, where the journal should end, and how
    many lines in the middle are corrupt.

    A line that is not a journal record is skipped with a warning naming its line number, and
    the records after it are kept; only a torn last line (cut short, or unreadable) is left
    out of the returned length, so the caller cuts it off.
    """
    entries = []
    corrupt = 0
    good_end = 0
    offset = 0
    with open(path, "rb") as fh:
        lines = list(enumerate(fh, start=1))
    for number, raw in lines:
        try:
            entry = json.loads(raw) if raw.endswith(b"\n") else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            entry = None
        if _is_record(entry):
            entries.append((offset, entry))
            good_end = offset + len(raw)
        elif number < len(lines):
            logger.warning(
                "%s line %d is corrupt: skipped, the lines after it are kept", path, number
            )
            corrupt += 1
            good_end = offset + len(raw)
        offset += len(raw)
    return entries, good_end, corrupt


class Journal:
    """Append-only record of finished images in a run folder.

    Arguments:
      folder: the run folder.
      fingerprint: the options that decide results; must match an existing journal's.
      source: the input the run labels (absolute folder or URI), recorded in the header; an
        existing journal of another input is refused (journals written before the header
        recorded it are compared with ``run.json``'s ``input_dir``).
    """

    def __init__(self, folder: Path, fingerprint: dict[str, Any], source: str | None = None):
        self.path = folder / JOURNAL_NAME
        self.fingerprint = fingerprint
        self.source = source
        self.offsets: dict[str, int] = {}
        self.skipped: dict[str, str] = {}
        self.notes: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, Any] = {}
        fresh = not self.path.exists()
        if not fresh:
            self._reopen()
        self._fh = open(self.path, "ab")
        if fresh:
            header = {"kind": "header", "fingerprint": fingerprint}
            self._append({**header, "input": source} if source else header)

    def _reopen(self) -> None:
        entries, good_end, corrupt = _valid_lines(self.path)
        if not entries or entries[0][1].get("kind") != "header":
            raise RunConflict(f"{self.path} is not a selfment-label journal", remedy="overwrite")
        self._check_source(entries[0][1])
        previous = entries[0][1].get("fingerprint")
        if not isinstance(previous, dict):
            raise RunConflict(
                f"{self.path} is damaged: its first line does not record the run's options",
                remedy="overwrite",
            )
        if previous != self.fingerprint:
            raise RunConflict(
                describe_mismatch(previous, self.fingerprint, self.path.parent), remedy="overwrite"
            )
        torn = good_end < self.path.stat().st_size
        if torn:
            logger.warning("cutting a torn last line off %s", self.path)
        if corrupt:
            entries = self._drop_corrupt_lines(entries, corrupt)
        elif torn:
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
        for offset, entry in entries[1:]:
            self._index(entry, offset)

    def _check_source(self, header: dict[str, Any]) -> None:
        """Refuse to resume a run of another input (see the class's ``source``)."""
        recorded = header.get("input") or _run_json_input(self.path.parent)
        if self.source and recorded and recorded != self.source:
            raise RunConflict(
                f"{self.path.parent} holds the run of {recorded}, not of {self.source}: a run "
                "folder belongs to one input",
                remedy="overwrite",
            )

    def _drop_corrupt_lines(
        self, entries: list[tuple[int, dict[str, Any]]], corrupt: int
    ) -> list[tuple[int, dict[str, Any]]]:
        """Rewrite the journal (atomically) with its records only, so a corrupt line is
        reported once: the images it held are not in the journal and are labelled again.
        Returns the records with their new offsets."""
        with open(self.path, "rb") as fh:
            data = fh.read()
        kept, offsets, offset = [], [], 0
        for start, _ in entries:
            line = data[start : data.index(b"\n", start) + 1]
            kept.append(line)
            offsets.append(offset)
            offset += len(line)
        with atomic_path(self.path) as tmp, open(tmp, "wb") as fh:
            fh.write(b"".join(kept))
            fh.flush()
            os.fsync(fh.fileno())
        logger.warning(
            "rewrote %s without its %d corrupt line(s); their images are labelled again",
            self.path,
            corrupt,
        )
        return [(new, entry) for new, (_, entry) in zip(offsets, entries, strict=True)]

    def _index(self, entry: dict[str, Any], offset: int) -> None:
        name = entry["file_name"]
        self.offsets[name] = offset
        self.keys[name] = entry.get("key")
        if entry["kind"] == "skip":
            self.skipped[name] = entry["reason"]
        else:
            self.skipped.pop(name, None)
        if entry.get("notes"):
            self.notes[name] = entry["notes"]
        else:
            self.notes.pop(name, None)

    def _append(self, entry: dict[str, Any]) -> int:
        offset = self._fh.tell()
        self._fh.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
        self._fh.flush()
        return offset

    def done(self, file_name: str, key: Any = None) -> bool:
        """Whether ``file_name`` is labelled, from the same bytes when ``key`` is given.

        A skipped image is never done: skips are retried on every resume (the options or the
        file may have changed since). An image whose content key differs from the one
        recorded is not done either: it is labelled again and its new record replaces the old.
        """
        if file_name not in self.offsets or file_name in self.skipped:
            return False
        recorded = self.keys.get(file_name)
        return key is None or recorded is None or recorded == key

    def add(self, entry: dict[str, Any]) -> None:
        """Append one image's result (``kind`` is ``image`` or ``skip``) and flush it."""
        self._index(entry, self._append(entry))

    def sync(self) -> None:
        """Force journal lines to disk."""
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Flush, sync and close the journal."""
        if not self._fh.closed:
            self.sync()
            self._fh.close()

    def labelled(self, names: list[str] | None = None) -> JournalRecords:
        """Re-iterable view of labelled images' records, sorted by file name."""
        return JournalRecords(self.path, self.offsets, self.skipped, names)


class JournalRecords:
    """Labelled records of a journal in file-name order, read lazily (constant memory)."""

    def __init__(
        self,
        path: Path,
        offsets: dict[str, int],
        skipped: dict[str, str],
        names: list[str] | None,
    ):
        self.path = path
        wanted = sorted(offsets) if names is None else sorted(set(names) & offsets.keys())
        self.names = [n for n in wanted if n not in skipped]
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with open(self.path, "rb") as fh:
            for name in self.names:
                fh.seek(self.offsets[name])
                entry = json.loads(fh.readline())
                entry.pop("kind", None)
                entry.pop("key", None)
                yield entry


def labelled_keys(folder: Path) -> dict[str, Any]:
    """File name -> content key of every image a run folder's journal holds as labelled.

    Read without the run's lock (a consumer such as ``review`` or ``export``); the latest
    record of an image wins, and an image whose latest record is a skip is left out. Empty when
    the folder has no journal.

    Arguments:
      folder: the run folder.
    """
    path = folder / JOURNAL_NAME
    if not path.is_file():
        return {}
    keys: dict[str, Any] = {}
    for _, entry in _valid_lines(path)[0]:
        if entry["kind"] == "image":
            keys[entry["file_name"]] = entry.get("key")
        elif entry["kind"] == "skip":
            keys.pop(entry["file_name"], None)
    return keys


def describe_mismatch(previous: dict[str, Any], current: dict[str, Any], folder: Path) -> str:
    """Human message for a run folder made with other options."""
    keys = sorted(set(previous) | set(current))
    changed = [
        f"{k}: {previous.get(k)!r} -> {current.get(k)!r}"
        for k in keys
        if previous.get(k) != current.get(k)
    ]
    return f"{folder} holds a run made with different options ({'; '.join(changed)})"

"""The one guard of every path the tool writes: checked before any work, nothing changed on disk.

Every writer (``run``/``apply`` run folders, ``train`` checkpoints, ``eval --per-image`` CSVs,
``export`` targets) calls ``check_output`` with its target before loading a model or training,
so a target that cannot or must not be written is refused in one sentence at once:

- the file system root, or a target that is, lies inside or (a folder) holds a protected folder
  (a run's input folder, the run folder an export reads); a target inside another run folder
  that lies in a protected folder is allowed (run folders are never read as input);
- a file a run folder keeps (``annotations.json``, ``run.json``, the journal, the lock,
  ``review.json``, ``scores/``, ``features/``);
- a folder where a file is wanted or a file where a folder is wanted, a path below a file, or a
  folder that cannot be written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from .data.storage import is_uri
from .errors import SelfmentError
from .runfolder.layout import RUN_FILES, RUN_NAME, is_run_folder


class OutputError(SelfmentError, RuntimeError):
    """A path the tool refuses to write (protected, a run's own file, or not writable)."""


def _inside_protected(path: Path, folder: Path, is_folder: bool) -> bool:
    """Whether ``path`` is, lies inside or (a folder) holds ``folder``; a path inside a run
    folder that itself lies inside ``folder`` does not count."""
    if path == folder or (is_folder and path in folder.parents):
        return True
    if folder not in path.parents:
        return False
    ancestors = path.parents[: path.parents.index(folder)]
    return not any(is_run_folder(ancestor) for ancestor in ancestors)


def _first_existing(path: Path) -> Path:
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_output(
    path: str | Path,
    what: str,
    *,
    folder: bool = False,
    protected: Mapping[Path, str] | None = None,
    run_file: str | None = None,
) -> None:
    """Refuse, in one sentence, a path the tool must not or cannot write; nothing is changed.

    Arguments:
      path: the target (need not exist).
      what: what would be written there, for the message (``the head checkpoint``).
      folder: the target is a folder (else a file).
      protected: folders the target must not be, lie inside nor (a folder target) hold, each
        with its role for the message (``{input_dir: "the run's input folder"}``).
      run_file: the one name of a run folder's own files this target may be (the feature
        cache may be a run's ``features``).

    Raises:
      OutputError: the target is refused, with the reason.
    """
    path = Path(path)
    resolved = path.resolve()
    refuse = f"refusing to write {what} to {path}"
    if resolved == resolved.parent:
        raise OutputError(f"{refuse}: it is the file system root")
    for guarded, role in (protected or {}).items():
        guarded = Path(guarded).resolve()
        if _inside_protected(resolved, guarded, folder):
            raise OutputError(f"{refuse}: it is, lies inside or holds {role} {guarded}")
    owned = resolved.name in RUN_FILES and resolved.name != run_file
    if owned and is_run_folder(resolved.parent):
        raise OutputError(
            f"{refuse}: {resolved.name} belongs to the run folder {resolved.parent}; "
            "choose another name"
        )
    _check_writable(path, what, folder)


def _check_writable(path: Path, what: str, folder: bool) -> None:
    """Refuse a target of the wrong kind, below a file, or in a folder that cannot be written."""
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder; choose a folder")
    if not folder and path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name")
    parent = _first_existing(path)
    if not parent.is_dir():
        raise OutputError(f"cannot write {what} to {path}: {parent} is a file, not a folder")
    writable = path if folder and path.exists() else parent
    if not os.access(writable, os.W_OK):
        raise OutputError(
            f"cannot write {what} to {path}: {writable} is not writable (permission denied "
            "or read-only)"
        )


def run_input_protection(run_dir: str | Path) -> dict[Path, str]:
    """The local input folder a run folder's ``run.json`` records, as ``check_output``'s
    ``protected`` (empty when there is none to protect: object storage, a bare COCO file, or a
    ``run.json`` that cannot be read, which the command's own reader then reports)."""
    try:
        recorded = json.loads((Path(run_dir) / RUN_NAME).read_text(encoding="utf-8"))
        input_dir = recorded.get("input_dir") if isinstance(recorded, dict) else None
    except (OSError, ValueError):
        return {}
    if not isinstance(input_dir, str) or not input_dir or is_uri(input_dir):
        return {}
    return {Path(input_dir): "the run's input folder"}

"""Every error the library raises on purpose is a ``SelfmentError``, and the CLI reports any
of them as one sentence with exit code 1."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import typer
from selfment_label_cli.console import ADVICE, user_errors
from selfment_label_cli.main import app
from typer.testing import CliRunner

import selfment_label
from selfment_label.errors import SelfmentError
from selfment_label.runfolder.journal import RunConflict
from selfment_label.runfolder.label import label_folder

INTERNAL = {"ImageSkip"}  # a skip signal caught inside the labelling loop, never raised out


def _library_exceptions() -> list[type[BaseException]]:
    found = []
    for module_info in pkgutil.walk_packages(selfment_label.__path__, "selfment_label."):
        module = importlib.import_module(module_info.name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(value, BaseException)
                and value.__module__ == module.__name__
                and value.__name__ not in INTERNAL
            ):
                found.append(value)
    return found


def test_every_library_error_is_a_selfment_error() -> None:
    found = _library_exceptions()
    assert len(found) >= 15
    outside = [f"{c.__module__}.{c.__name__}" for c in found if not issubclass(c, SelfmentError)]
    assert not outside, f"library errors without the SelfmentError base: {outside}"


def test_the_cli_reports_any_library_error_as_one_sentence(capsys) -> None:
    with pytest.raises(typer.Exit) as raised, user_errors():
        raise RunConflict("the run folder belongs to another input")
    assert raised.value.exit_code == 1
    assert "error: the run folder belongs to another input" in capsys.readouterr().err


def test_a_library_error_states_the_fact_and_the_cli_adds_its_flags(tmp_path, capsys) -> None:
    """A run folder holding a foreign annotations.json: the library's sentence names no
    command-line flag (its ``remedy`` says what to change); the CLI's names ``--overwrite``."""
    images, out = tmp_path / "images", tmp_path / "run"
    images.mkdir()
    out.mkdir()
    (out / "annotations.json").write_text("{}")
    with pytest.raises(RunConflict) as raised:
        label_folder(images, out)
    assert "did not journal" in str(raised.value) and "--" not in str(raised.value)
    assert raised.value.remedy == "overwrite"
    result = CliRunner().invoke(app, ["run", str(images), "--out", str(out)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "did not journal; use --overwrite to replace it, or choose another --out" in text


def test_every_remedy_the_library_names_has_cli_advice() -> None:
    """Each ``remedy="..."`` in the library's sources is a key of the CLI's ``ADVICE``."""
    root = Path(selfment_label.__file__).parent
    named = {
        name
        for path in root.rglob("*.py")
        for name in re.findall(r'remedy="(\w+)"', path.read_text(encoding="utf-8"))
    }
    assert len(named) >= 5
    assert named <= set(ADVICE), f"remedies without CLI advice: {named - set(ADVICE)}"

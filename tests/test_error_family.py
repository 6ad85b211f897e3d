"""Every error the library raises on purpose is a ``SelfmentError``, and the CLI reports any
of them as one sentence with exit code 1."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import typer
from selfment_label_cli.console import user_errors

import selfment_label
from selfment_label.errors import SelfmentError
from selfment_label.runfolder.journal import RunConflict

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

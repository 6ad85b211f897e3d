"""The one base of every error the library raises on purpose.

A ``SelfmentError`` is a user's mistake or bad input (a folder of another run, damaged
weights, an output path that must not be written, ...), explained in one sentence: catch it to
catch "a selfment-label error", and show ``str(error)`` as it is. Every other exception is a
bug. Each specific class keeps its historical built-in base too (``RuntimeError``,
``ValueError``), so code that caught those still does.
"""

from __future__ import annotations


class SelfmentError(Exception):
    """Base of the library's deliberate errors; its message is one sentence for the user."""

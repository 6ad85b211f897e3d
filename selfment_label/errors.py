"""The one base of every error the library raises on purpose.

A ``SelfmentError`` is a user's mistake or bad input (a folder of another run, damaged
weights, an output path that must not be written, ...), stated in one sentence: catch it to
catch "a selfment-label error", and show ``str(error)`` as it is. The sentence states the
fact in the library's words; what the caller can change to get past it is ``remedy``, the
name of the argument or option to change, which a front end words in its own terms (the CLI
names its flags, ``selfment_label_cli.console.ADVICE``). Every other exception is a bug. Each
specific class keeps its historical built-in base too (``RuntimeError``, ``ValueError``), so
code that caught those still does.
"""

from __future__ import annotations


class SelfmentError(Exception):
    """Base of the library's deliberate errors; its message is one sentence for the user.

    Arguments:
      message: what is wrong.
      remedy: the argument or option whose change gets past the error (``overwrite``,
        ``out_dir``, ``weights``, ``backbone``, ``refine``, ``ray_address``, ...), or None.
      context: values the front end's advice may name (``run_dir``, ``name``, ...).
    """

    def __init__(
        self,
        message: str = "",
        *,
        remedy: str | None = None,
        context: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.remedy = remedy
        self.context = dict(context or {})

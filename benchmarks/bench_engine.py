"""Speed benchmark of the engine: the ``selfment-label bench`` command with repository defaults.

Without arguments it measures the shared dev set with the shared backbone:

    .venv/bin/python benchmarks/bench_engine.py
    .venv/bin/python benchmarks/bench_engine.py IMAGES --weights FILE --resolution 448 --no-rss

Every option of ``selfment-label bench --help`` is accepted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from selfment_label_cli.main import app

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
DEFAULT_IMAGES = SHARED / "data" / "ecssd-dev" / "images"
DEFAULT_WEIGHTS = SHARED / "weights" / "dinov2_vits14.safetensors"


def main(argv: list[str]) -> None:
    """Run ``bench`` with the shared images and weights unless the caller names others."""
    args = list(argv)
    if not args or args[0].startswith("-"):
        args.insert(0, str(DEFAULT_IMAGES))
    if "--weights" not in args and not os.environ.get("SELFMENT_WEIGHTS"):
        args += ["--weights", str(DEFAULT_WEIGHTS)]
    app(["bench", *args], prog_name="bench_engine.py")


if __name__ == "__main__":
    main(sys.argv[1:])

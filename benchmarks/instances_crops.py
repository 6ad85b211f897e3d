"""``run --mode instances`` with and without ``--zoom``: class-agnostic COCO figures as labels.

``run --mode instances`` sees an image at one scale (448 px on the long side by default), so a
COCO street or table scene gets about 1.3 masks per image: small objects are one or two
patches. ``--zoom`` also labels four corner crops of each image (``--zoom-crop`` of its width
and height, each at the full resolution) and merges the crop masks that find new objects into
the full view's (``selfment_label.zoom``). This benchmark labels the images once without zoom
and once per crop fraction with it (``label_folder``, as ``run`` does), and prints AP, AP50,
AR@100 (``COCOeval``, one category, as ``benchmarks/instances_coco.py``), masks per image and
the run's backbone and wall seconds (``run.json``)::

    python -m benchmarks.instances_crops --images ../shared/data/coco-dev/images \\
        --gt ../shared/data/coco-dev/instances.json \\
        --weights ../shared/weights/dinov2_vits14.safetensors --work /tmp/crops \\
        --zoom-crop 0.5 0.6 0.7 --precision fp32

The runs are written to ``WORK/full`` and ``WORK/zoom-FRACTION`` (reused: runs resume);
``selfment-label train WORK/zoom-0.6`` learns an instance head from one of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

if not __package__:  # run as `python benchmarks/X.py`: import the checkout's benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import load_backbone
from benchmarks.instances_coco import (
    add_coco_arguments,
    check_coco_arguments,
    class_agnostic_eval,
)
from selfment_label.config import (
    DEFAULT_PRECISION,
    DEFAULT_ZOOM,
    MAX_ZOOM,
    MIN_ZOOM,
    PRECISION_NAMES,
    RunConfig,
    mode_config,
)
from selfment_label.runfolder.label import label_folder
from selfment_label.runfolder.layout import RUN_NAME


def main() -> None:
    """Label without and with zoom, evaluate and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_coco_arguments(parser)
    parser.add_argument(
        "--zoom-crop", type=float, nargs="+", default=[DEFAULT_ZOOM], help="crop side / image side"
    )
    parser.add_argument("--precision", choices=PRECISION_NAMES, default=DEFAULT_PRECISION)
    args = parser.parse_args()
    check_coco_arguments(parser, args)
    if not all(MIN_ZOOM <= fraction <= MAX_ZOOM for fraction in args.zoom_crop):
        parser.error(f"--zoom-crop must be in [{MIN_ZOOM}, {MAX_ZOOM}]")
    backbone = load_backbone(args.weights)
    config = RunConfig(
        weights=str(args.weights), precision=args.precision, segment=mode_config("instances")
    )
    runs = [("full view (run --mode instances)", args.work / "full", config)]
    runs += [
        (
            f"--zoom --zoom-crop {fraction}",
            args.work / f"zoom-{fraction}",
            replace(config, zoom=fraction),
        )
        for fraction in args.zoom_crop
    ]
    table = Table(title="instances as labels, without and with --zoom")
    for column in ("labels", "AP", "AP50", "AR@100", "masks / image", "backbone s", "wall s"):
        table.add_column(column, justify="left" if column == "labels" else "right")
    for label, run_dir, run_config in runs:
        label_folder(args.images, run_dir, run_config, backbone=backbone)
        figures = class_agnostic_eval(args.gt, run_dir)
        record = json.loads((run_dir / RUN_NAME).read_text())
        table.add_row(
            label,
            *(f"{figures[key]:.2f}" for key in ("AP", "AP50", "AR@100", "masks/img")),
            f"{record['stage_seconds'].get('backbone', 0.0):.1f}",
            f"{record['wall_seconds']:.1f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()

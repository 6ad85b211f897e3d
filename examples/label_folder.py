"""Label a folder of images with the Python API and print what was found.

Usage:
    python examples/label_folder.py IMAGES OUT [--weights FILE]
"""

from __future__ import annotations

import argparse

from selfment_label import RunConfig, label_folder, read_run


def main() -> None:
    """Run the engine on a folder, then read the COCO file back."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images")
    parser.add_argument("out")
    parser.add_argument("--weights", default=None, help="local backbone weights file")
    parser.add_argument("--resolution", type=int, default=RunConfig.resolution)
    args = parser.parse_args()

    config = RunConfig(weights=args.weights, resolution=args.resolution)
    summary = label_folder(args.images, args.out, config)
    print(
        f"labelled {summary.labelled}, skipped {len(summary.skipped)}, "
        f"{summary.images_per_second:.2f} images/s"
    )
    run = read_run(summary.out_dir)
    for image, image_annotations in run.images():
        for ann in image_annotations:
            x, y, w, h = ann["bbox"]
            print(
                f"{image['file_name']}: box ({x:.0f}, {y:.0f}, {w:.0f}, {h:.0f}), "
                f"area {ann['area']}, score {ann['score']:.3f}"
            )


if __name__ == "__main__":
    main()

"""Write the labelled samples bundled in ``samples/``: the app's Misclassifications page scans them with no setup.

Usage: ``python scripts/make_samples.py [--datasets ../shared/datasets] [--out samples]``.

Copies, byte for byte, the first files (sorted by name) of every class folder:

- ``cifar10/test/<class>/``: 100 per class, 1,000 CIFAR-10 test images (32 px) -> ``samples/cifar10/test/``
- ``imagenette-128/val/<class>/``: 50 per class, 500 Imagenette val images (128 px) -> ``samples/imagenette/val/``

The same inputs give the same files: nothing is re-encoded, the choice is by sorted name. Existing
class folders in the output are replaced, so a rerun also removes files no longer chosen.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# (source split under --datasets, destination under --out, images per class)
SAMPLES: tuple[tuple[str, str, int], ...] = (
    ("cifar10/test", "cifar10/test", 100),
    ("imagenette-128/val", "imagenette/val", 50),
)


def pick(class_dir: Path, count: int) -> list[Path]:
    """The first ``count`` image files of a class folder, by name."""
    files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < count:
        raise SystemExit(f"error: {class_dir} holds {len(files)} images, {count} are needed")
    return files[:count]


def copy_split(source: Path, dest: Path, per_class: int) -> int:
    """Copy ``per_class`` images of every class folder of ``source`` to ``dest``; returns the bytes written."""
    classes = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SystemExit(f"error: no class folders in {source}")
    written = 0
    for class_dir in classes:
        out = dest / class_dir.name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for path in pick(class_dir, per_class):
            shutil.copyfile(path, out / path.name)
            written += path.stat().st_size
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=REPO_ROOT.parent / "shared" / "datasets",
                        help="folder holding cifar10/ and imagenette-128/ (default: ../shared/datasets)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "samples")
    args = parser.parse_args(argv)
    total = 0
    for source, dest, per_class in SAMPLES:
        if not (args.datasets / source).is_dir():
            print(f"error: {args.datasets / source} not found (pass --datasets)", file=sys.stderr)
            return 2
        size = copy_split(args.datasets / source, args.out / dest, per_class)
        print(f"{args.out / dest}: {per_class} images per class, {size / 1e6:.2f} MB")
        total += size
    print(f"total {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

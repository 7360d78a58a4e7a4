"""What does the DG recipe's check of a data folder cost per image?

``recipes.dg.data.scan_images`` opens, verifies and decodes every image file once before training (JPEGs at a reduced
scale). This writes ``--count`` JPEGs per ``--sizes`` (random texture, quality 90, like photos of that size) into a
temporary folder and times the check as the recipe runs it (threads over the usable cores), one thread, and a full
decode, in ms per image (the best of ``--repeats``, files in the page cache). Results: benchmarks/results/.

    PYTHONPATH=. python benchmarks/dg_image_check.py      # from the repository root
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from recipes.dg import data
from recipes.dg.parallel import usable_cores


def write_jpegs(folder: str, size: int, count: int) -> list[str]:
    rng = np.random.default_rng(size)
    coarse = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR), dtype=int)
    os.makedirs(os.path.join(folder, "dom", "cls"))
    files = []
    for i in range(count):
        noisy = np.clip(smooth + rng.integers(-20, 20, smooth.shape), 0, 255).astype(np.uint8)
        files.append(os.path.join("dom", "cls", f"{i}.jpg"))
        Image.fromarray(noisy).save(os.path.join(folder, files[-1]), quality=90)
    return files


def best_ms(fn, count: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * min(times) / count, 3)


def measure(size: int, count: int, repeats: int) -> dict:
    """One row: ``count`` JPEGs of ``size`` x ``size`` checked as the recipe does, on one thread, fully decoded."""
    with tempfile.TemporaryDirectory() as folder:
        files = write_jpegs(folder, size, count)
        paths = [os.path.join(folder, f) for f in files]
        return {
            "size": size,
            "images": count,
            "mean_file_kb": round(sum(os.path.getsize(f) for f in paths) / count / 1024, 1),
            "check_ms": best_ms(lambda: data.scan_images(folder, files, progress=False), count, repeats),
            "check_one_thread_ms": best_ms(lambda: [data.image_problem(f) for f in paths], count, repeats),
            "full_decode_one_thread_ms": best_ms(lambda: [data.read_image(f) for f in paths], count, repeats),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[227, 640], help="Square image sizes (227: PACS).")
    p.add_argument("--count", type=int, default=500, help="Images per size.")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default="benchmarks/results/dg_image_check.json")
    args = p.parse_args()
    rows = []
    for size in args.sizes:
        rows.append(measure(size, args.count, args.repeats))
        print(rows[-1])
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"cores": usable_cores(), "rows": rows}, f, indent=2)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()

"""Reading the image files of a data folder: decoding to RGB whatever the mode, and the one-time check of every file.

A file is bad when it has zero bytes, is a broken link, is not an image Pillow reads, or fails to decode (a truncated
JPEG fails only when decoded). Truncated images are not read padded with grey, as DomainBed's
``LOAD_TRUNCATED_IMAGES`` does: that changes the data under its label without a word; the user decides, with
``--skip_bad_images``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

SKIP_OPTION = "--skip_bad_images"
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit greyscale PNG / TIFF


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 3-channel RGB, whatever its mode: ``convert("RGB")`` (grey, palette and CMYK expanded, alpha
    dropped, as torchvision's loader does), except 16-bit greyscale, scaled to 8 bits first (``convert`` clips it at
    255: the image would be white)."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))  # mode L
    return img.convert("RGB")


def read_image(path: str, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decodes the image file ``path`` (EXIF orientation applied, as ``datasets.Image`` does) as RGB.

    ``draft`` lets a JPEG decode at a reduced scale (still reading every byte of it): the folder check uses it.
    """
    with Image.open(path) as img:
        if draft is not None:
            img.draft(None, draft)
        img.load()
        if img.getexif().get(ExifTags.Base.Orientation) is not None:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def image_problem(path: str) -> str | None:
    """Why the image file ``path`` cannot be read (``None`` if it can): zero bytes, a broken link, not an image, or a
    decoding error such as truncation. Checks the header (Pillow's ``verify``) and decodes the whole file."""
    try:
        if os.path.getsize(path) == 0:
            return "zero bytes"
    except OSError:
        return "broken symbolic link" if os.path.islink(path) else "cannot be opened"
    try:
        with Image.open(path) as img:
            img.verify()
        read_image(path, draft=(1, 1))
    except UnidentifiedImageError:
        return "cannot identify image file (not an image, or a format Pillow cannot read)"
    except Exception as err:  # whatever Pillow raises (OSError, SyntaxError, ValueError, ...), the file is unusable
        message = f"{type(err).__name__}: {err}"
        return f"truncated ({message})" if "truncated" in message.lower() else message
    return None


@dataclass(frozen=True)
class BadImage:
    """An image file of a data folder that cannot be read."""

    path: str  # relative to the data folder: <domain>/<class>/<file>
    reason: str


class BadImagesError(ValueError):
    """Image files of a data folder that cannot be read; the message lists every one and the fix."""

    def __init__(self, root: str, bad: list[BadImage], checked: int):
        self.bad = bad
        listing = "\n".join(f"  {os.path.join(root, b.path)}: {b.reason}" for b in bad)
        super().__init__(
            f"{len(bad)} of the {checked} image files in {root!r} cannot be read:\n{listing}\n"
            "Repair or remove them (download or extract the data set again), or pass "
            f"{SKIP_OPTION} to train without them (their count and names are then recorded in results.json and "
            "results.md). Nothing was trained."
        )


def scan_images(root: str, files: list[str], progress: bool = True) -> list[BadImage]:
    """Checks every file once (``image_problem``, in threads: Pillow decodes without the GIL), with a progress bar;
    returns the unreadable ones, in the order of ``files``."""
    from tqdm.auto import tqdm

    paths = [os.path.join(root, f) for f in files]
    threads = min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        reasons = list(
            tqdm(
                pool.map(image_problem, paths, chunksize=16),
                total=len(paths),
                desc="checking images",
                unit="img",
                leave=False,
                disable=not progress,
            )
        )
    return [BadImage(f, reason) for f, reason in zip(files, reasons) if reason is not None]

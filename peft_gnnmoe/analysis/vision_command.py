"""``peft-gnnmoe analyze --image ...``: the analyses on a vision transformer (ViT, DINOv2, ...) and some photos.

Writes ``report.json``, the three plots of the text command and one patch-grid picture per image
(``vision_maps_<n>.png``). ``--image`` takes a file or ``skimage:NAME`` (a scikit-image sample photo, e.g.
``skimage:astronaut``, which needs scikit-image); ``--model`` a vision model's Hub id or local folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def load_image(spec: str) -> np.ndarray:
    """An ``H, W, 3`` uint8 RGB array from a file path or ``skimage:NAME``."""
    if spec.startswith("skimage:"):
        try:
            from skimage import data
        except ImportError:
            raise SystemExit(
                f"--image {spec}: the sample photos need scikit-image (`pip install scikit-image`)."
            ) from None

        name = spec.split(":", 1)[1]
        if not hasattr(data, name):
            raise SystemExit(f"--image {spec}: scikit-image has no sample image {name!r}.")
        image = getattr(data, name)()
    else:
        from PIL import Image

        if not Path(spec).is_file():
            raise SystemExit(f"--image {spec}: no such file.")
        image = np.asarray(Image.open(spec).convert("RGB"))
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3]


def load_vision_model(name: str, dtype):
    """``(model, image_processor)`` of a vision model (Hub id or folder), with eager attention (attention weights)."""
    from transformers import AutoImageProcessor, AutoModel

    try:
        model = AutoModel.from_pretrained(name, dtype=dtype, attn_implementation="eager")
        processor = AutoImageProcessor.from_pretrained(name)
    except OSError as exc:  # no such folder, not on the Hub, or offline without a cached copy
        raise SystemExit(f"--model {name!r}: cannot load a vision model and its image processor ({exc})") from None
    return model, processor


def run_images(args: argparse.Namespace, device, dtype) -> int:
    import torch

    from .plotting import plot_attention_sinks, plot_bos_cosine, plot_massive_activations
    from .report import analyze
    from .vision import patch_grid
    from .vision_plots import plot_vision_maps

    model, processor = load_vision_model(args.model, dtype)
    model.to(device)
    images = [load_image(spec) for spec in args.image]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device=device, dtype=dtype)
    start = time.perf_counter()
    report = analyze(
        model,
        {"pixel_values": pixels},
        magnitude_threshold=args.magnitude_threshold,
        ratio_threshold=args.ratio_threshold,
        sink_threshold=args.sink_threshold,
        sink_ratio=args.sink_ratio,
    )
    seconds = time.perf_counter() - start
    report.update(model=args.model, images=args.image, device=str(device), dtype=args.dtype, seconds=round(seconds, 2))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot_massive_activations(report["massive_activations"], out / "massive_activations.png")
    plot_attention_sinks(report["attention_sinks"], out / "attention_sinks.png", layer=args.head_layer)
    plot_bos_cosine(report["bos_cosine"], out / "bos_cosine.png")
    grid = patch_grid(model, pixels)
    crops = [_shown(pixels[b]) for b in range(len(images))]
    for b, crop in enumerate(crops):
        plot_vision_maps(report, out / f"vision_maps_{b}.png", grid, crop, batch=b)
    print(_summary(report, out, seconds, torch.get_num_threads(), len(images)))
    return 0


def _shown(pixels) -> np.ndarray:
    """The processed image as the model sees it, rescaled to [0, 1] for display."""
    image = pixels.detach().float().cpu().permute(1, 2, 0).numpy()
    return (image - image.min()) / max(float(image.max() - image.min()), 1e-6)


def _summary(report: dict, out: Path, seconds: float, threads: int, num_images: int) -> str:
    from .summary import summary

    text = summary(dict(report, token_text=report["tokens"]), out)
    return (
        f"{text}, and {num_images} patch-grid maps (vision_maps_*.png)\n"
        f"analysis forward passes: {seconds:.1f} s on {threads} threads"
    )

"""Pretrains the small ViT backbone of the embedded DG benchmark and saves it with save_pretrained.

The embedded benchmark (``python -m recipes.dg`` with no --dataset) classifies digits; this backbone never sees a
digit. It is trained on two label spaces at once, each half of every batch:

* the 60,000 Fashion-MNIST training images (clothing, 10 classes) that Debian's ``dataset-fashion-mnist`` package
  ships (``apt-get install dataset-fashion-mnist``);
* formula-driven contours: ``--contour_classes`` random stroke shapes (1-3 cubic Bezier strokes each, drawn from a
  seeded formula), every image a new random deformation, thickness and colouring of its class's shape. Pretraining
  ViTs on such auto-generated contours instead of real images is Kataoka et al.'s "Replacing Labeled Real-image
  Datasets with Auto-generated Contours" (CVPR 2022). Fashion-MNIST alone teaches silhouettes; the contours teach
  strokes, which is what any character-like target needs, without using a single character.

The result is a ``ViTModel`` checkpoint (config.json + model.safetensors + preprocessor_config.json) that
``AutoModelForImageClassification.from_pretrained`` loads like any Hub checkpoint, with a fresh classification head.

    python -m recipes.dg.pretrain_backbone                   # writes assets/vit-tiny-fashion-contours (~20 min)
    python -m recipes.dg.pretrain_backbone --epochs 1 --output_dir /tmp/vit   # quick check

Deterministic for a given machine and thread count (seeded data order, augmentation and initialisation).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import struct
import time

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKBONE_DIR = os.path.join(REPO, "assets", "vit-tiny-fashion-contours")  # the embedded benchmark's backbone


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX (MNIST format) ``.gz`` file into a uint8 array."""
    with gzip.open(path, "rb") as f:
        _, _, dtype, ndim = struct.unpack(">BBBB", f.read(4))
        if dtype != 0x08:
            raise ValueError(f"{path}: expected unsigned-byte IDX data, got type code {dtype:#x}.")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def load_fashion_mnist(folder: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train images, train labels, test images, test labels)`` from Debian's Fashion-MNIST files."""
    names = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} are missing from {folder}; install Debian's `dataset-fashion-mnist` "
            "(apt-get install dataset-fashion-mnist) or pass --fashion_dir."
        )
    arrays = [torch.from_numpy(read_idx(os.path.join(folder, n)).copy()) for n in names]
    return arrays[0], arrays[1].long(), arrays[2], arrays[3].long()


def to_rgb(x: torch.Tensor, size: int, g: torch.Generator | None) -> torch.Tensor:
    """uint8 ``[B, 28, 28]`` → float RGB ``[B, 3, size, size]`` in [0, 1]; with ``g``, random augmentation:
    resized crop (scale 0.6…1), horizontal flip, and for half of the images a random ink/paper colouring."""
    x = x.float().div(255).unsqueeze(1)
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if g is None:
        return x.expand(-1, 3, -1, -1)
    b = x.shape[0]
    area = torch.rand(b, generator=g) * 0.4 + 0.6
    ratio = torch.exp((torch.rand(b, generator=g) - 0.5) * 2 * math.log(4 / 3))
    w, h = torch.sqrt(area * ratio).clamp(max=1), torch.sqrt(area / ratio).clamp(max=1)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = w * flip, h
    theta[:, 0, 2] = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)
    theta[:, 1, 2] = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
    grid = torch.nn.functional.affine_grid(theta, [b, 1, size, size], align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    paper, ink = torch.rand(b, 3, 1, 1, generator=g), torch.rand(b, 3, 1, 1, generator=g)
    colour = (torch.rand(b, 1, 1, 1, generator=g) < 0.5).float()
    plain = x.expand(-1, 3, -1, -1)
    return colour * (paper * (1 - x) + ink * x) + (1 - colour) * plain


class Contours:
    """Formula-driven contour classes: class ``c`` is a fixed set of 1-3 cubic Bezier strokes (control points drawn
    from a generator seeded with ``seed`` and ``c``); ``sample`` draws deformed, rethickened instances as grey
    images in [0, 1]."""

    def __init__(self, num_classes: int, seed: int, points: int = 48):
        g = torch.Generator().manual_seed(seed)
        self.num_classes, self.points = num_classes, points
        self.strokes = torch.randint(1, 4, (num_classes,), generator=g)  # strokes per class
        self.ctrl = torch.rand(num_classes, 3, 4, 2, generator=g) * 1.6 - 0.8  # class, stroke, control point, xy

    def sample(self, labels: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
        b = len(labels)
        ctrl = self.ctrl[labels] + torch.randn(b, 3, 4, 2, generator=g) * 0.06  # per-instance deformation
        angle = (torch.rand(b, generator=g) - 0.5) * 0.5
        scale = torch.rand(b, 1, generator=g) * 0.3 + 0.75
        shear = (torch.rand(b, generator=g) - 0.5) * 0.4
        rot = torch.stack([torch.cos(angle), -torch.sin(angle) + shear, torch.sin(angle), torch.cos(angle)], -1)
        ctrl = torch.einsum("bij,bskj->bski", rot.view(b, 2, 2), ctrl) * scale.view(b, 1, 1, 1)
        ctrl = ctrl + (torch.rand(b, 1, 1, 2, generator=g) - 0.5) * 0.3
        t = torch.linspace(0, 1, self.points).view(1, 1, -1, 1)
        p0, p1, p2, p3 = ctrl.unbind(2)  # each B, S, 2
        curve = (
            (1 - t) ** 3 * p0[:, :, None]
            + 3 * (1 - t) ** 2 * t * p1[:, :, None]
            + 3 * (1 - t) * t**2 * p2[:, :, None]
            + t**3 * p3[:, :, None]
        )  # B, S, P, 2
        used = (torch.arange(3).view(1, 3) < self.strokes[labels].view(b, 1)).float()  # B, S
        axis = torch.linspace(-1, 1, size)
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).view(1, 1, 1, -1, 2)  # x, y per pixel
        d2 = ((curve[:, :, :, None] - grid) ** 2).sum(-1)  # B, S, P, H*W
        width = (torch.rand(b, 1, 1, 1, generator=g) * 0.05 + 0.05) ** 2
        ink = torch.exp(-d2 / width).amax(2) * used[..., None]  # B, S, H*W
        return ink.amax(1).view(b, size, size).clamp(0, 1)


def main(argv: list[str] | None = None) -> None:
    """Pretrains the backbone and saves it to ``--output_dir``."""
    p = argparse.ArgumentParser(
        prog="python -m recipes.dg.pretrain_backbone",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output_dir", default=BACKBONE_DIR)
    p.add_argument("--fashion_dir", default=FASHION_DIR, help="folder with Fashion-MNIST's four *-ubyte.gz files")
    p.add_argument("--image_size", type=int, default=28)
    p.add_argument("--patch_size", type=int, default=4)
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--mlp_size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--contour_classes", type=int, default=200, help="formula-driven contour classes (0: none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load_fashion_mnist(args.fashion_dir)
    contours = Contours(args.contour_classes, seed=args.seed + 1) if args.contour_classes else None
    names = CLASSES + [f"contour-{c}" for c in range(args.contour_classes)]
    config = ViTConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_channels=3,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        intermediate_size=args.mlp_size,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={c: i for i, c in enumerate(names)},
    )
    model = ViTForImageClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(xtr) // args.batch_size
    total = steps_per_epoch * args.epochs
    warmup = steps_per_epoch // 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    mean = std = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    bar = tqdm(total=total, desc="pretrain (Fashion-MNIST + contours)")
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            images, labels = xtr[idx], ytr[idx]
            if contours is not None:  # the second half of the batch: contour images
                half = len(idx) // 2
                shape = torch.randint(args.contour_classes, (len(idx) - half,), generator=g)
                drawn = (contours.sample(shape, 28, g) * 255).to(torch.uint8)
                images, labels = torch.cat([images[:half], drawn]), torch.cat([labels[:half], shape + len(CLASSES)])
            x = (to_rgb(images, args.image_size, g) - mean) / std
            loss = model(pixel_values=x, labels=labels).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    bar.close()

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(xte), 1000):
            x = (to_rgb(xte[i : i + 1000], args.image_size, None) - mean) / std
            logits = model(pixel_values=x).logits[:, : len(CLASSES)]
            correct += (logits.argmax(-1) == yte[i : i + 1000]).sum().item()
    acc = correct / len(xte)
    print(f"Fashion-MNIST test accuracy {acc:.4f} after {time.time() - start:.0f}s")

    # the backbone only: a ViTModel without pooler; classification heads are added by whoever loads it
    os.makedirs(args.output_dir, exist_ok=True)
    model.vit.config.architectures = ["ViTModel"]
    model.vit.config.id2label, model.vit.config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    model.vit.save_pretrained(args.output_dir, safe_serialization=True)
    from transformers import ViTImageProcessor  # imported here: it warns when torchvision is missing

    ViTImageProcessor(
        size={"height": args.image_size, "width": args.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "pretraining.json"), "w") as f:
        json.dump(
            {
                "data": "Fashion-MNIST (Debian dataset-fashion-mnist), 60,000 train images, and "
                f"{args.contour_classes} formula-driven contour classes",
                "script": "recipes/dg/pretrain_backbone.py",
                "args": vars(args) | {"output_dir": None},
                "fashion_mnist_test_accuracy": acc,
                "seconds": round(time.time() - start),
            },
            f,
            indent=2,
        )
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()

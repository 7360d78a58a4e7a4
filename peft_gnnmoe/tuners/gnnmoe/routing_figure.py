"""A picture of GNN-MoE's routing: each patch of an image coloured by the expert its router chose first."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_BLOCK_LISTS = ("layers", "layer", "blocks")


def _layer_label(router_name: str) -> str:
    """``vit.encoder.layer.3.attention...`` → ``layer 3``; names without a block index stay as they are."""
    parts = router_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in _BLOCK_LISTS and parts[i + 1].isdigit():
            return f"layer {parts[i + 1]}"
    return router_name


def _patch_grid(name: str, assignment: dict[str, Any], num_patches: int) -> tuple[int, int]:
    grid = assignment.get("grid")
    if grid is None:
        side = round(num_patches**0.5)
        grid = (side, side)
    rows, cols = int(grid[0]), int(grid[1])
    if rows * cols != num_patches:
        raise ValueError(
            f"Router {name!r} routed {num_patches} patch tokens, which do not fill its patch grid {rows}x{cols} "
            f"({'from the model config' if assignment.get('grid') is not None else 'assumed square'}); "
            "set GNNMoEConfig.patch_grid or num_prefix_tokens to match the model's tokens."
        )
    return rows, cols


def _to_display(images: torch.Tensor) -> torch.Tensor:
    """uint8 or float ``[N, 3, H, W]`` → float ``[N, H, W, 3]`` in [0, 1] on the CPU."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W] (RGB), got shape {tuple(images.shape)}.")
    images = images.detach().cpu()
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0.0, 1.0)
    return x.permute(0, 2, 3, 1)


def plot_expert_assignments(
    images: torch.Tensor,
    assignments: dict[str, dict[str, Any]],
    path: str | os.PathLike | None = None,
    title: str = "",
) -> Figure:
    """Draw the top-1 expert of every patch over the images it was routed for.

    One row per image: the input, then one panel per router (one per adapted layer, or per shared q/k/v group) with
    each patch of the image coloured by the expert its router ranked first; a legend names the experts.

    Args:
        images: the images of the forward pass, ``[N, 3, H, W]``, uint8 or float in [0, 1] (other values are
            clipped); pass the unnormalised pixels, not the model's normalised input.
        assignments: [`get_expert_assignments`][peft_gnnmoe.get_expert_assignments]'s output for that forward pass
            (any ViT-family model: the special tokens before the patches are skipped, the patch grid is read from it
            or assumed square).
        path: where to save the figure (PNG or any format matplotlib infers from the suffix); folders are created.
        title: the figure's title.

    Returns:
        The matplotlib ``Figure`` (built without pyplot, so no global state or backend is touched).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not assignments:
        raise ValueError(
            "assignments is empty: run a forward pass of the GNN-MoE model before get_expert_assignments."
        )
    pixels = _to_display(images)
    n, height, width = pixels.shape[:3]
    routers = list(assignments.items())
    for name, assignment in routers:
        if assignment["topk_index"].shape[0] != n:
            raise ValueError(
                f"Router {name!r} holds the routing of {assignment['topk_index'].shape[0]} images but {n} images "
                "were given: pass the images of the forward pass that get_expert_assignments read."
            )
    num_experts = 1 + max(int(a["topk_index"].max()) for _, a in routers)
    cmap = colormaps["tab10" if num_experts <= 10 else "tab20"]

    fig = Figure(figsize=(1.6 * (len(routers) + 1), 1.6 * n + 0.8))
    axes = fig.subplots(n, len(routers) + 1, squeeze=False)
    for i in range(n):
        axes[i][0].imshow(pixels[i].numpy())
        for j, (name, assignment) in enumerate(routers):
            top1 = assignment["topk_index"][i, :, 0].cpu()
            patches = top1[int(assignment["num_prefix_tokens"]) :]
            expert = patches.reshape(_patch_grid(name, assignment, len(patches))).numpy()
            ax = axes[i][j + 1]
            ax.imshow(pixels[i].numpy())
            ax.imshow(
                expert,
                cmap=cmap,
                vmin=-0.5,
                vmax=cmap.N - 0.5,
                alpha=0.55,
                interpolation="nearest",
                extent=(-0.5, width - 0.5, height - 0.5, -0.5),  # the patch grid over the image's pixel edges
            )
            if i == 0:
                ax.set_title(_layer_label(name), fontsize=8)
    axes[0][0].set_title("input", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=cmap(e), label=f"expert {e}") for e in range(num_experts)]
    fig.legend(handles=handles, loc="lower center", ncol=num_experts, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    if path is not None:
        folder = os.path.dirname(os.fspath(path))
        if folder:
            os.makedirs(folder, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig

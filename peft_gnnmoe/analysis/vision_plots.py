"""Patch-grid pictures of an image's analysis report: token norm, attention received and cosine to CLS per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .plotting import _save, plt


def _grid(values: list[float], prefix: int, rows: int, cols: int) -> np.ndarray:
    return np.asarray(values[prefix:], dtype=float).reshape(rows, cols)


def vision_maps_figure(
    report: dict[str, Any],
    grid: tuple[int, int],
    image: np.ndarray | None = None,
    batch: int = 0,
    layers: list[int] | None = None,
):
    """One row per quantity (L2 norm of each token, attention it receives, cosine to CLS), one column per layer.

    ``report`` is [`analyze`][peft_gnnmoe.analysis.analyze]'s dict for an image batch, ``grid`` the ``(rows, cols)``
    patch grid; the prefix tokens (CLS, registers) are the values before the patches and are written in each panel's
    title.
    ``layers`` defaults to four layers spread over the depth (the last included).
    """
    massive, sinks, cosine = report["massive_activations"], report["attention_sinks"], report["bos_cosine"]
    num_layers = len(massive["layers"])
    layers = layers or sorted({round(i * (num_layers - 1) / 3) for i in range(4)})
    rows, cols = grid
    prefix = len(sinks["mean_scores"][batch]) - rows * cols
    names = (report.get("tokens") or [[]])[batch][:prefix] or ["?"] * prefix
    quantities = [
        ("token L2 norm", [massive["layers"][at]["norms"][batch] for at in layers], "magma"),
        ("attention received", [sinks["layer_scores"][batch][at] for at in layers], "viridis"),
        ("cosine to CLS", [cosine["cosine"][batch][cosine["layers"].index(at)] for at in layers], "coolwarm"),
    ]
    extra = 1 if image is not None else 0
    fig, axes = plt.subplots(3, len(layers) + extra, figsize=(2.6 * (len(layers) + extra), 7.6), squeeze=False)
    for r, (title, per_layer, cmap) in enumerate(quantities):
        if extra:
            axes[r, 0].imshow(image)
            axes[r, 0].set_title(title, fontsize=9)
            axes[r, 0].axis("off")
        for c, (at, values) in enumerate(zip(layers, per_layer)):
            ax = axes[r, c + extra]
            kwargs = {"vmin": -1, "vmax": 1} if cmap == "coolwarm" else {}
            shown = ax.imshow(_grid(values, prefix, rows, cols), cmap=cmap, **kwargs)
            head = ", ".join(f"{n} {v:.3g}" for n, v in zip(names, values[:prefix]))
            ax.set_title(f"layer {at}" + (f"\n{head}" if head else ""), fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
            fig.colorbar(shown, ax=ax, shrink=0.7)
    fig.suptitle("per patch (prefix tokens' values in the titles)", fontsize=9)
    return fig


def plot_vision_maps(
    report: dict[str, Any], path: str | Path, grid: tuple[int, int], image: np.ndarray | None = None, batch: int = 0
) -> Path:
    """Save [`vision_maps_figure`][peft_gnnmoe.analysis.vision_plots.vision_maps_figure] as a PNG."""
    return _save(vision_maps_figure(report, grid, image, batch), path)

"""PNG plots of the analysis reports (matplotlib, Agg backend). They take the plain reports (or their dicts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _as_dict(report: Any) -> dict:
    return report.to_dict() if hasattr(report, "to_dict") else report


def _token_ticks(ax, tokens: list[str] | None, length: int, max_labels: int = 48) -> None:
    if tokens is None or length > max_labels:
        return
    ax.set_xticks(range(length))
    ax.set_xticklabels([t.replace("\n", "\\n") for t in tokens[:length]], rotation=90, fontsize=7)


def plot_massive_activations(report: Any, path: str | Path) -> Path:
    """Per layer: the top-k |activation| values and the median |activation| (log scale), as in Sun et al. Fig. 1."""
    data = _as_dict(report)
    layers = [s["layer"] for s in data["layers"]]
    k = max((len(s["top"]) for s in data["layers"]), default=0)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for rank in range(k):
        values = [abs(s["top"][rank]["value"]) if rank < len(s["top"]) else np.nan for s in data["layers"]]
        ax.plot(layers, values, marker="o", ms=3, label=f"top {rank + 1}")
    ax.plot(layers, [s["median"] for s in data["layers"]], marker="o", ms=3, color="gray", label="median")
    ax.axhline(data["magnitude_threshold"], ls="--", lw=0.8, color="red", label="magnitude threshold")
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("|activation|")
    features = data.get("repeated_features") or sorted(int(f) for f in data["features"])
    ax.set_title(f"Largest residual-stream activations (massive features: {features[:6]})", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_attention_sinks(
    report: Any, path: str | Path, tokens: list[str] | None = None, batch: int = 0, layer: int | None = None
) -> Path:
    """Sink score per layer and key (mean over heads), and per head and key at ``layer`` (default: the middle one)."""
    data = _as_dict(report)
    layer_scores = np.asarray(data["layer_scores"][batch], dtype=float)  # L, T
    scores = np.asarray(data["scores"][batch], dtype=float)  # L, H, T
    layer = layer_scores.shape[0] // 2 if layer is None else layer
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1.3, 1]})
    image = axes[0].imshow(layer_scores, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axes[0].set_xlabel("key position")
    axes[0].set_ylabel("layer")
    axes[0].set_title("attention received (mean over heads)", fontsize=9)
    _token_ticks(axes[0], tokens, layer_scores.shape[1])
    axes[1].imshow(scores[layer], aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axes[1].set_xlabel("key position")
    axes[1].set_ylabel("head")
    axes[1].set_title(f"per head at layer {layer}", fontsize=9)
    _token_ticks(axes[1], tokens, scores.shape[-1])
    fig.colorbar(image, ax=axes, shrink=0.8, label="sink score")
    return _save(fig, path)


def plot_bos_cosine(report: Any, path: str | Path, tokens: list[str] | None = None, batch: int = 0) -> Path:
    """Cosine similarity to BOS per layer and token, and its per-layer mean over valid non-BOS tokens."""
    data = _as_dict(report)
    cosine = np.asarray([[np.nan if v is None else v for v in row] for row in data["cosine"][batch]], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1.6, 1]})
    image = axes[0].imshow(cosine, aspect="auto", cmap="coolwarm", vmin=-1, vmax=1)
    axes[0].set_yticks(range(len(data["layers"])))
    axes[0].set_yticklabels(data["layers"], fontsize=6)
    axes[0].set_xlabel("token position")
    axes[0].set_ylabel("layer")
    axes[0].set_title(f"cos(h[BOS], h[t]) (BOS at {data['bos_positions'][batch]})", fontsize=9)
    _token_ticks(axes[0], tokens, cosine.shape[1])
    fig.colorbar(image, ax=axes[0], shrink=0.8)
    axes[1].plot(data["layers"], data["mean_per_layer"], marker="o", ms=3)
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("mean cosine to BOS")
    axes[1].set_title(f"mean over tokens (all layers: {data['mean']:.3f})", fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

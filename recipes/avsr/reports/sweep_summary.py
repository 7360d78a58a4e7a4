"""The λ sweep's summary: per λ the mean ± std over seeds of every figure, and the λ chosen on validation loss."""

from __future__ import annotations

from recipes.common.stats import mean_std

REPORTED = ("val_loss", "wer", "mean_bos_cosine", "top_activation", "massive_activations", "layers_with_sinks")


def summarise_sweep(rows: list[dict]) -> dict:
    """Per λ the mean (and std over seeds) of every reported figure; ``chosen`` = the λ of lowest mean validation
    loss (ties: the smaller λ)."""
    cells = []
    for weight in sorted({r["decor_weight"] for r in rows}):
        group = [r for r in rows if r["decor_weight"] == weight]
        cell = {"decor_weight": weight, "seeds": [r["seed"] for r in group]}
        for field in REPORTED:
            cell[field] = mean_std([float(r[field]) for r in group])
        cells.append(cell)
    chosen = min(cells, key=lambda c: (c["val_loss"]["mean"], c["decor_weight"]))["decor_weight"]
    return {"rate": rows[0]["rate"], "chosen": chosen, "cells": cells, "rows": rows}

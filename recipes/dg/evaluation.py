"""Evaluation of a prepared model: accuracy over a loader sharded by Accelerate, on the model's device."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .batches import normalize


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are: every tensor the recipe feeds the model goes there first."""
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, loader, mean, std, desc: str) -> tuple[float, int]:
    """Accuracy over a prepared loader; ``gather_for_metrics`` drops the samples padded for even sharding."""
    model.eval()
    device = model_device(model)
    correct = total = 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        images, labels = images.to(device), labels.to(device)
        logits = model(pixel_values=normalize(images.float() / 255.0, mean, std)).logits
        preds, labels = accelerator.gather_for_metrics((logits.argmax(-1), labels))
        correct += (preds == labels).sum().item()
        total += labels.numel()
    return correct / max(total, 1), total

"""TRL integration: ``SFTTrainer`` that trains sink-decorrelation adapters with their loss term.

TRL's ``SFTTrainer`` computes the loss itself, from the per-token log-probabilities of a fused LM head, and never
reads the model's ``loss``, where the sink-decorrelation tuner adds its term. This subclass collects the term of every
training forward and adds it to TRL's loss with TRL's own normalisation (``num_items_in_batch``, several processes),
so ``loss = CE + weight * L_decor`` exactly as under ``transformers.Trainer``, with or without packing. It logs
``decorrelation_loss`` beside TRL's metrics. Models without a sink-decorrelation adapter train as with TRL's class.

Example:
    ```py
    from peft import LoraConfig
    from peft_gnnmoe import SinkDecorrelationConfig
    from peft_gnnmoe.trl import SFTTrainer
    from trl import SFTConfig

    trainer = SFTTrainer(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        args=SFTConfig(output_dir="out", packing=True),
        train_dataset=dataset,
        peft_config=SinkDecorrelationConfig(base_config=LoraConfig(r=16), weight=0.1),
    )
    trainer.train()
    ```
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

try:
    import trl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("peft_gnnmoe.trl needs TRL: pip install 'peft-gnnmoe[trl]' (or pip install trl).") from error

from .tuners.sink_decorrelation import SinkDecorrelationModel

__all__ = ["SFTTrainer"]


def sink_decorrelation_tuner(model: nn.Module) -> SinkDecorrelationModel | None:
    """The sink-decorrelation tuner inside ``model`` (a PeftModel, possibly wrapped by DDP or accelerate), or None."""
    for module in model.modules():
        if isinstance(module, SinkDecorrelationModel):
            return module
    return None


class SFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` whose loss includes the sink-decorrelation term; same arguments and behaviour otherwise."""

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        tuner = sink_decorrelation_tuner(model)
        if tuner is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if num_items_in_batch is not None:  # the term weights its sequences with TRL's normalisation
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        with tuner.collect_loss_terms() as terms:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not terms:
            return result
        loss, outputs = result if return_outputs else (result, None)
        # TRL scales its loss by the number of processes when num_items_in_batch counts every process's tokens (DDP
        # averages the gradients); the term is normalised by the same count
        scale = 1
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            scale = self.accelerator.num_processes // getattr(self, "get_tp_size", lambda: 1)()
        loss = loss + scale * torch.stack([term.to(loss.device) for term, _ in terms]).sum()
        metrics = getattr(self, "_metrics", None)
        if metrics is not None:
            with contextlib.suppress(KeyError, TypeError):
                mean = torch.stack([m.to(loss.device) for _, m in terms]).mean()
                metrics["train"]["decorrelation_loss"].append(self.accelerator.gather_for_metrics(mean).mean().item())
        return (loss, outputs) if return_outputs else loss

"""The training group: optimisation, checkpoints, trackers, and the embedded stand-ins' pretraining."""

from __future__ import annotations

from dataclasses import dataclass

from recipes.common.options import MIXED_PRECISION_CHOICES, REPORT_TO_CHOICES

from .fields import option


@dataclass(frozen=True)
class TrainConfig:
    """Training: AdamW (β 0.9/0.98) + cosine schedule over projectors and LoRA, with checkpoints."""

    epochs: float = option(10, "training epochs (the embedded preset: 12, the real preset: 4)", type=float)
    max_steps: int | None = option(None, "optimizer steps; overrides --epochs", type=int)
    lr: float | None = option(None, "default 1e-3 (asr, avsr) / 5e-4 (vsr), as Llama-AVSR", type=float)
    weight_decay: float = option(0.1, "AdamW weight decay", advanced=True)
    warmup_steps: int | None = option(None, "default: 5%% of the steps", advanced=True, type=int)
    gradient_accumulation_steps: int = option(1, "batches per optimizer step")
    mixed_precision: str | None = option(
        None, "autocast dtype (default: accelerate's config)", choices=MIXED_PRECISION_CHOICES
    )
    checkpointing_steps: int = option(0, "checkpoint every N optimizer steps (0: none)")
    checkpoints_total_limit: int | None = option(
        None, "newest checkpoints kept (default all)", advanced=True, type=int
    )
    resume_from_checkpoint: str | None = option(None, "checkpoint dir to resume from, or 'latest'")
    report_to: str = option(
        "none", "tracker of the training loss and learning rate (accelerate's log_with)", choices=REPORT_TO_CHOICES
    )
    val_utts: int = option(
        0,
        "hold out the last N training utterances and log their loss after every epoch (train_log.json)",
        advanced=True,
    )
    average_last: int = option(
        0,
        "at the end of training, average the weights of the last N checkpoints (--checkpointing_steps) into final/",
        advanced=True,
    )
    encoder_pretrain_steps: int = option(800, "embedded encoders: CTC steps", advanced=True)
    text_pretrain_steps: int = option(300, "embedded LLM: language-model steps", advanced=True)

    def __post_init__(self):
        if self.average_last < 0 or self.val_utts < 0:
            raise ValueError("--average_last and --val_utts take a count >= 0")
        if self.average_last and not self.checkpointing_steps:
            raise ValueError("--average_last N averages saved checkpoints: pass --checkpointing_steps as well")
        if self.average_last and self.checkpoints_total_limit and self.checkpoints_total_limit < self.average_last:
            raise ValueError(
                f"--average_last {self.average_last} needs at least that many checkpoints kept "
                f"(--checkpoints_total_limit {self.checkpoints_total_limit})"
            )

    def learning_rate(self, modality: str) -> float:
        """``lr``, or Llama-AVSR's default: 5e-4 for VSR, 1e-3 for ASR and AVSR."""
        return self.lr or (5e-4 if modality == "vsr" else 1e-3)

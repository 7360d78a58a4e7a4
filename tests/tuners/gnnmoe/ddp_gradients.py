"""Worker for test_trainer.py: the first optimizer step's gradients of a GNN-MoE ViT under Trainer, written by rank 0.
(test_trainer.py also uses its ``Images`` and ``CaptureGradients``.)

Run with ``torchrun --nproc_per_node N ddp_gradients.py OUT.pt`` (CPU, gloo): the effective batch is 8 images,
``8 / N`` per process, so every N must give the same (averaged) gradients.
"""

import gc
import os
import sys

import torch
import transformers as T
from peft import get_peft_model
from torch.utils.data import Dataset

from peft_gnnmoe import GNNMoEConfig


class Images(Dataset):
    def __init__(self, size: int = 8):
        generator = torch.Generator().manual_seed(3)
        self.pixels = torch.randn(size, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 3, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


class CaptureGradients(T.TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def main(out: str) -> None:
    torch.manual_seed(0)
    vit = T.ViTForImageClassification(
        T.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            num_labels=3,
        )
    )
    config = GNNMoEConfig(
        init_weights=False,
        router_noise_std=0.0,
        balance_loss_weight=5.0,
        z_loss_weight=1.0,
        modules_to_save=["classifier"],
    )
    model = get_peft_model(vit, config)
    args = T.TrainingArguments(
        output_dir="trainer_out",
        per_device_train_batch_size=8 // int(os.environ.get("WORLD_SIZE", "1")),
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,  # no clipping: the gradients as computed
        seed=0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        ddp_backend="gloo",
    )
    capture = CaptureGradients(model)
    T.Trainer(model=model, args=args, train_dataset=Images(), callbacks=[capture]).train()
    if args.process_index == 0:
        torch.save({n: g.cpu() for n, g in capture.grads.items()}, out)
    shut_down_process_group()


def shut_down_process_group() -> None:
    """Wait for every rank, then tear the gloo group down explicitly: left to interpreter exit, its threads can abort
    a rank (``terminate called without an active exception``) on a loaded machine."""
    gc.collect()  # the DDP reducer holds the group: release it first, or the group's destructor can hang later
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

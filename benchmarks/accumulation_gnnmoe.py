"""Does the GNN-MoE auxiliary loss keep its weight under gradient accumulation and several processes?

A tiny random ViT with GNN-MoE adapters (large aux weights, no router noise, no dropout) takes one optimizer step under
``transformers.Trainer`` on the same 8 images, split as 1 x 8, 2 x 4 and 4 x 2 (gradient accumulation, one process)
and as 2 processes x 4 (``torchrun``, gloo on CPU). Printed: ``|g| / |g_ref|`` and the relative difference
``|g - g_ref| / |g_ref|`` of the first step's gradients (all trainable parameters), against 1 process, k = 1.

    PYTHONPATH=. python benchmarks/accumulation_gnnmoe.py      # from the repository root

(``PYTHONPATH=.`` makes the checkout's ``peft_gnnmoe`` win over an installed one; the printed path says which ran.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch
import transformers as T
from peft import get_peft_model
from torch.utils.data import Dataset

import peft_gnnmoe


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


def first_step_gradients(accumulation: int, output_dir: str) -> dict[str, torch.Tensor]:
    """Gradients of the first optimizer step; the per-device batch is 8 / (accumulation * processes)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
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
    config = peft_gnnmoe.GNNMoEConfig(
        init_weights=False,
        router_noise_std=0.0,
        balance_loss_weight=5.0,
        z_loss_weight=1.0,
        modules_to_save=["classifier"],
    )
    model = get_peft_model(vit, config)
    args = T.TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=8 // (accumulation * world_size),
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,  # no clipping: the gradients as computed
        seed=0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        ddp_backend="gloo" if world_size > 1 else None,
        disable_tqdm=True,
    )
    capture = CaptureGradients(model)
    T.Trainer(model=model, args=args, train_dataset=Images(), callbacks=[capture]).train()
    return {n: g.cpu() for n, g in capture.grads.items()}


def compare(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, float]:
    flat = torch.cat([grads[n].flatten() for n in reference])
    ref = torch.cat([g.flatten() for g in reference.values()])
    return (flat.norm() / ref.norm()).item(), ((flat - ref).norm() / ref.norm()).item()


def two_processes(tmp: str) -> dict[str, torch.Tensor]:
    out = os.path.join(tmp, "two.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29411"]
    command += [os.path.abspath(__file__), "--worker", out]
    # the workers must import the same peft_gnnmoe as this process
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(peft_gnnmoe.__file__)))
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])
    )
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return torch.load(out)


def main() -> None:
    print(f"peft_gnnmoe from {os.path.dirname(peft_gnnmoe.__file__)}")
    with tempfile.TemporaryDirectory() as tmp:
        reference = first_step_gradients(1, tmp)
        rows = [("1 process, k=1 (reference)", reference)]
        rows += [(f"1 process, k={k}", first_step_gradients(k, tmp)) for k in (2, 4)]
        rows.append(("2 processes x 4, k=1", two_processes(tmp)))
    print(f"{'run':<28} {'|g| / |g_ref|':>14} {'rel. difference':>16}")
    for name, grads in rows:
        ratio, difference = compare(grads, reference)
        print(f"{name:<28} {ratio:>14.6f} {difference:>16.2e}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        with tempfile.TemporaryDirectory() as tmp:
            grads = first_step_gradients(1, tmp)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(grads, sys.argv[2])
    else:
        main()

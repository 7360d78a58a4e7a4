"""Does gradient accumulation or the number of processes change the sink-decorrelation gradients under Trainer?

One Trainer step of a tiny random-init Llama (3 layers, width 32, LoRA r=4 on q/v, ``SinkDecorrelationConfig(weight=
5)``) on the same 4 sequences of lengths 9, 4, 7, 6: with ``gradient_accumulation_steps`` k = 1, 2, 4 at the same
effective batch, and with 1 vs 2 processes (``torchrun --standalone --nproc_per_node 2``, gloo on CPU, the Trainer
default ``average_tokens_across_devices=True``). Prints ``|g_k| / |g_1|`` and ``|g_k - g_1| / |g_1|`` of the adapter
gradients before the first optimizer step (no clipping). Both must be 1 and 0 up to float error.

    PYTHONPATH=. python benchmarks/accumulation_sink.py                # this checkout's peft_gnnmoe
    PYTHONPATH=/path/to/other/checkout python benchmarks/accumulation_sink.py   # another one, e.g. an old commit

The first line printed says which ``peft_gnnmoe`` was imported.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers as T
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import peft_gnnmoe
from peft_gnnmoe import SinkDecorrelationConfig

LENGTHS = (9, 4, 7, 6)


def build_model(weight: float) -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    sink = SinkDecorrelationConfig(base_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), weight=weight)
    model = get_peft_model(T.AutoModelForCausalLM.from_config(config), sink)
    generator = torch.Generator().manual_seed(100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # LoRA is not a no-op
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def dataset() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    rows = []
    for length in LENGTHS:
        ids = torch.cat([torch.tensor([1]), torch.randint(3, 64, (length - 1,), generator=generator)])
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    seq_len = max(len(r["input_ids"]) for r in rows)
    pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {
        key: torch.stack([torch.nn.functional.pad(r[key], (0, seq_len - len(r[key])), value=value) for r in rows])
        for key, value in pad.items()
    }


class FirstStepGradients(T.TrainerCallback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {
                n.removeprefix("module."): p.grad.detach().clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }


def first_step_gradients(weight: float, accumulation: int, output_dir: str) -> tuple[dict[str, torch.Tensor], int]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    grab = FirstStepGradients()
    args = T.TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=len(LENGTHS) // (accumulation * world_size),
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        log_level="error",
    )
    trainer = T.Trainer(
        model=build_model(weight), args=args, train_dataset=dataset(), data_collator=collate, callbacks=[grab]
    )
    trainer.train()
    return grab.grads, trainer.args.process_index


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[k].flatten() for k in sorted(grads)])


def compare(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, float]:
    a, b = flat(grads), flat(reference)
    return (a.norm() / b.norm()).item(), ((a - b).norm() / b.norm()).item()


def two_processes(weight: float, workdir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(workdir, "two.safetensors")
    package_root = str(Path(peft_gnnmoe.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    result = subprocess.run(
        command + ["--worker", path, "--weight", str(weight)], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"the 2-process run failed:\n{result.stderr[-4000:]}")
    return load_file(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weight", type=float, default=5.0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: write this process group's gradients here
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        if args.worker:
            grads, rank = first_step_gradients(args.weight, 1, workdir)
            if rank == 0:
                save_file({k: v.contiguous() for k, v in grads.items()}, args.worker)
            return
        print(f"peft_gnnmoe from {Path(peft_gnnmoe.__file__).parent}, weight {args.weight}")
        reference, _ = first_step_gradients(args.weight, 1, workdir)
        print("| run | |g| / |g_1| | |g - g_1| / |g_1| |")
        print("| --- | ---: | ---: |")
        for k in (1, 2, 4):
            grads, _ = first_step_gradients(args.weight, k, workdir)
            ratio, difference = compare(grads, reference)
            print(f"| 1 process, k={k} | {ratio:.6f} | {difference:.2e} |")
        ratio, difference = compare(two_processes(args.weight, workdir), reference)
        print(f"| 2 processes, k=1 | {ratio:.6f} | {difference:.2e} |")


if __name__ == "__main__":
    main()

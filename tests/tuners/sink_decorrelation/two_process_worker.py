"""One Trainer step of a tiny sink-decorrelation model; rank 0 writes the adapter gradients to ``argv[1]``.

Run alone (one process, batch 4) or with ``torchrun --standalone --nproc_per_node 2`` (two processes, batch 2 each,
gloo on CPU): the gradients must agree. Used by test_two_processes.py.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
import transformers as T
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from peft_gnnmoe import SinkDecorrelationConfig

LENGTHS = (9, 4, 7, 6)


def _model(weight: float):
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    sink = SinkDecorrelationConfig(base_config=lora, weight=weight)
    model = get_peft_model(T.AutoModelForCausalLM.from_config(config), sink)
    generator = torch.Generator().manual_seed(100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _dataset() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    rows = []
    for length in LENGTHS:
        ids = torch.cat([torch.tensor([1]), torch.randint(3, 64, (length - 1,), generator=generator)])
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def _collate(rows):
    seq_len = max(len(r["input_ids"]) for r in rows)
    pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {
        key: torch.stack([torch.nn.functional.pad(r[key], (0, seq_len - len(r[key])), value=value) for r in rows])
        for key, value in pad.items()
    }


class _Grab(T.TrainerCallback):
    grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main(path: str, weight: float) -> None:
    grads, process_index = _train(os.path.dirname(path), weight)
    if process_index == 0:
        save_file({n.removeprefix("module."): grads[n].contiguous() for n in sorted(grads)}, path)
    # explicit teardown, once the trainer (and the DDP reducer, which holds the process group) is gone: destroyed
    # while a reducer still held it, the group's destructor could hang joining gloo's threads; left to interpreter
    # exit, gloo can abort a rank
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _train(output_dir: str, weight: float) -> tuple[dict[str, torch.Tensor], int]:
    """One Trainer step; returns the gradients before the optimizer step and this process's index."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    grab = _Grab()
    args = T.TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=len(LENGTHS) // world_size,
        max_steps=1,
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    trainer = T.Trainer(
        model=_model(weight), args=args, train_dataset=_dataset(), data_collator=_collate, callbacks=[grab]
    )
    trainer.train()
    return grab.grads, trainer.args.process_index


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 5.0)

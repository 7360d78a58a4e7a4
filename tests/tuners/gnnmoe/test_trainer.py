"""The routers' auxiliary loss under gradient accumulation and several processes: the first optimizer step's gradients
do not depend on how the effective batch of 8 images is split (Trainer, an accelerate loop, 1 vs 2 processes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from peft import get_peft_model
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainingArguments

from peft_gnnmoe import GNNMoEConfig

from .ddp_gradients import CaptureGradients, Images

REPO = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("ddp_gradients.py")

# large aux weights, so that a wrongly weighted aux loss shows in the gradients; no randomness in the forward
AUX_CONFIG = dict(
    init_weights=False,
    router_noise_std=0.0,
    balance_loss_weight=5.0,
    z_loss_weight=1.0,
    modules_to_save=["classifier"],
)


def _relative_difference(grads: dict, reference: dict) -> float:
    assert grads.keys() == reference.keys()
    diff = torch.cat([(grads[n] - reference[n]).flatten() for n in reference]).norm()
    return (diff / torch.cat([g.flatten() for g in reference.values()]).norm()).item()


def _trainer_gradients(make_vit, tmp_path, accumulation: int, **config) -> dict[str, torch.Tensor]:
    model = get_peft_model(make_vit(seed=0), GNNMoEConfig(**AUX_CONFIG, **config))
    args = TrainingArguments(
        output_dir=str(tmp_path / f"k{accumulation}-{config.get('expert_dispatch', 'auto')}"),
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,  # no clipping: the gradients as computed
        seed=0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
    )
    capture = CaptureGradients(model)
    Trainer(model=model, args=args, train_dataset=Images(), callbacks=[capture]).train()
    assert capture.grads is not None
    return capture.grads


def test_trainer_gradient_accumulation_gives_the_same_first_step_gradients(make_vit, tmp_path):
    reference = _trainer_gradients(make_vit, tmp_path, 1)
    assert any(g.abs().sum() > 0 for n, g in reference.items() if "gnnmoe_router" in n)
    for accumulation in (2, 4):
        grads = _trainer_gradients(make_vit, tmp_path, accumulation)
        assert _relative_difference(grads, reference) <= 1e-5, accumulation


def test_trainer_gradient_accumulation_with_sparse_dispatch(make_vit, tmp_path):
    sparse = dict(num_experts=16, expert_dispatch="sparse")
    reference = _trainer_gradients(make_vit, tmp_path, 1, **sparse)
    assert _relative_difference(_trainer_gradients(make_vit, tmp_path, 2, **sparse), reference) <= 1e-5


class PaddedText(Dataset):
    """8 right-padded sequences of different lengths: samples carry different numbers of label tokens."""

    def __init__(self, pad: int, vocab: int, length: int = 10):
        generator = torch.Generator().manual_seed(4)
        self.rows = []
        for n in (10, 3, 7, 5, 9, 4, 6, 8):
            ids = torch.full((length,), pad)
            ids[:n] = torch.randint(3, vocab, (n,), generator=generator)
            mask = (torch.arange(length) < n).long()
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def _lm_trainer_gradients(make_lm, lm_tokens, tmp_path, accumulation: int) -> dict[str, torch.Tensor]:
    config = dict(AUX_CONFIG, target_modules=["q_proj", "k_proj", "v_proj"], graph="knn", knn_k=3)
    config.pop("modules_to_save")
    model = get_peft_model(make_lm("llama", seed=0), GNNMoEConfig(**config))
    args = TrainingArguments(
        output_dir=str(tmp_path / f"lm{accumulation}"),
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,
        seed=0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
    )
    capture = CaptureGradients(model)
    dataset = PaddedText(lm_tokens["pad"], lm_tokens["vocab"])
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[capture]).train()
    return capture.grads


def test_trainer_accumulation_on_padded_text_with_unequal_label_counts(make_lm, lm_tokens, tmp_path):
    reference = _lm_trainer_gradients(make_lm, lm_tokens, tmp_path, 1)
    for accumulation in (2, 4):
        grads = _lm_trainer_gradients(make_lm, lm_tokens, tmp_path, accumulation)
        assert _relative_difference(grads, reference) <= 1e-5, accumulation


def _accelerate_gradients(make_vit, accumulation: int) -> dict[str, torch.Tensor]:
    model = get_peft_model(make_vit(seed=0), GNNMoEConfig(**AUX_CONFIG)).train()
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
    loader = DataLoader(Images(), batch_size=8 // accumulation, shuffle=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            if accelerator.sync_gradients:
                return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            optimizer.step()
            optimizer.zero_grad()
    raise AssertionError("the loader ended before the first optimizer step")


def test_accelerate_accumulation_gives_the_same_gradients(make_vit):
    reference = _accelerate_gradients(make_vit, 1)
    for accumulation in (2, 4):
        assert _relative_difference(_accelerate_gradients(make_vit, accumulation), reference) <= 1e-5, accumulation


def _run_worker(tmp_path: Path, processes: int) -> dict[str, torch.Tensor]:
    out = tmp_path / f"grads{processes}.pt"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_port", str(29500 + processes + os.getpid() % 1000), str(WORKER), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.distributed
def test_one_and_two_processes_give_the_same_averaged_gradients(tmp_path):
    one = _run_worker(tmp_path, 1)
    two = _run_worker(tmp_path, 2)
    assert _relative_difference(two, one) <= 1e-5

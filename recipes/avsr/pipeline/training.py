"""Training one AVSR run: AdamW + cosine schedule over projectors and LoRA, with checkpoints and a tracker."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from recipes.common.checkpoints import load_checkpoint, resolve_resume, save_checkpoint
from recipes.common.options import mixed_precision

from .config.train import TrainConfig
from .evaluation import validation_loss
from .weights import register_trainable_checkpointing

Log = Callable[[str], None]


def make_accelerator(config: TrainConfig | None = None, project_dir: str | Path | None = None) -> Accelerator:
    """The process's one ``Accelerator``; its checkpoints hold only the trainable weights (safetensors).

    ``config.report_to`` (accelerate's ``log_with``) receives the training loss, its parts and the learning rate of
    every optimizer step, under ``project_dir`` (the run's output folder); ``"none"`` logs nowhere.
    """
    config = config or TrainConfig()
    trackers = {} if config.report_to == "none" else {"log_with": config.report_to, "project_dir": project_dir}
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=mixed_precision(config.mixed_precision),
        **trackers,
    )
    if trackers:
        accelerator.init_trackers("avsr", config={"report_to": config.report_to})
    register_trainable_checkpointing(accelerator)
    return accelerator


def set_epoch(loader, epoch: int) -> int:
    """Put ``loader`` (prepared or not) at ``epoch`` and return this process's number of batches in it.

    The bucket sampler's batches (and their number) depend on the epoch; accelerate forwards ``set_epoch`` to it
    only in a single process (with several, its ``BatchSamplerShard`` sits in between), so it is set here directly.
    A prepared loader then gives this process's share.
    """
    if hasattr(loader, "set_epoch"):  # accelerate's loaders (also their RNG synchronisation)
        loader.set_epoch(epoch)
    inner = loader.batch_sampler
    while inner is not None and not hasattr(inner, "set_epoch"):
        inner = getattr(inner, "batch_sampler", None)
    if inner is not None:
        inner.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):  # the augmentation's draws (worker processes copy it at each epoch)
        loader.dataset.set_epoch(epoch)
    return len(loader)


def total_steps(loader, epochs: float, grad_accum: int) -> int:
    """Optimizer steps of ``epochs`` epochs (a fraction for the last), counted epoch by epoch on this process's
    share of the batches; an epoch's last, partial accumulation also steps."""
    total, epoch = 0, 0
    while epoch < epochs:
        steps = math.ceil(set_epoch(loader, epoch) / grad_accum)
        total += steps if epoch + 1 <= epochs else math.ceil((epochs - epoch) * steps)
        epoch += 1
    return total


def train(
    config: TrainConfig,
    accelerator: Accelerator,
    model,
    loader,
    run_dir: Path,
    modality: str,
    log: Log,
    skipped: dict[str, str] | None = None,
    val_loader=None,
) -> dict:
    """AdamW (β 0.9/0.98) + cosine schedule over the trainable weights, checkpoints every ``checkpointing_steps``.

    Checkpoints go to ``run_dir/checkpoints/step_<N>`` (:mod:`recipes.common.checkpoints`: atomic, the newest
    ``checkpoints_total_limit`` kept) with the epoch and the batches of it already consumed;
    ``resume_from_checkpoint`` is such a folder or ``"latest"``. Files skipped as unreadable are added to
    ``skipped`` (uid -> reason). With a ``val_loader``, the loss on it is logged after every epoch (``{"step",
    "epoch", "val_loss"}`` rows of the history). The loss and learning rate go to ``accelerator.log`` (the
    ``report_to`` tracker) at every optimizer step.
    """
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    skipped = {} if skipped is None else skipped
    lr = config.learning_rate(modality)
    loader = accelerator.prepare(loader)  # first: the step count depends on this process's share of the batches
    total = config.max_steps or total_steps(loader, config.epochs, accelerator.gradient_accumulation_steps)
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, total // 20)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
    # accelerate steps a prepared scheduler once per process at every optimizer step: scale it to match
    n = accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup * n, total * n)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, epoch, done, history = 0, 0, 0, []  # optimizer steps, epoch, its batches consumed, loss log
    resume = resolve_resume(run_dir, config.resume_from_checkpoint)
    if resume is not None:
        state = load_checkpoint(accelerator, resume)
        step, epoch, done, history = state["step"], state["epoch"], state["batches"], state["history"]
        log(f"resumed from {resume} at step {step} (epoch {epoch}, batch {done})")

    n_params = sum(p.numel() for p in params)
    log(f"[{modality}] training {n_params:,} parameters for {total} steps (lr {lr}, warmup {warmup})")
    model.train()
    start = time.time()
    bar = tqdm(total=total, initial=step, desc=f"train {modality}", disable=not accelerator.is_local_main_process)
    while step < total:
        set_epoch(loader, epoch)
        epoch_loader = accelerator.skip_first_batches(loader, done) if done else loader
        fresh, usable = done == 0, 0
        for batch in epoch_loader:
            done += 1
            skipped.update(batch.get("skipped", {}))
            if not batch["uids"]:  # every file of the batch was unreadable
                continue
            usable += 1
            with accelerator.accumulate(model):
                out = model(batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            record = {"step": step, "loss": round(out.loss.item(), 4)}
            parts = {"ce": out.ce_loss, "decor": out.decorrelation_loss, "ctc": out.ctc_loss}
            record.update({name: round(v.item(), 4) for name, v in parts.items() if v is not None})
            history.append(record)
            accelerator.log({f"train/{modality}/{k}": v for k, v in record.items() if k != "step"}
                            | {f"train/{modality}/lr": scheduler.get_last_lr()[0]}, step=step)  # fmt: skip
            bar.update(1)
            bar.set_postfix({k: v for k, v in record.items() if k != "step"})  # the loss and its parts
            if config.checkpointing_steps and step % config.checkpointing_steps == 0:
                state = {"step": step, "epoch": epoch, "batches": done, "history": history}
                save_checkpoint(accelerator, run_dir, step, state, config.checkpoints_total_limit)
            if step >= total:
                break
        if fresh and not usable:  # the next epoch would be the same: stop instead of spinning at this step
            raise RuntimeError(
                f"{modality} training: no file of epoch {epoch} could be read ({len(skipped)} skipped, e.g. "
                f"{list(skipped.values())[:3]}); check the data (--data_dir, the labels CSV, the file formats)"
            )
        if val_loader is not None:
            history.append({"step": step, "epoch": epoch, "val_loss": validation_loss(accelerator, model, val_loader)})
            log(f"[{modality}] epoch {epoch}: validation loss {history[-1]['val_loss']}")
        epoch, done = epoch + 1, 0
    bar.close()
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "steps": step,
        "lr": lr,
        "train_seconds": round(time.time() - start, 1),
        "trainable_params": n_params,
        "final_loss": losses[-1] if losses else None,
        "history": history,
    }

"""The DG sweep: every (trial seed, held-out domain, method) of the protocol, trained and evaluated under Accelerate.

``Sweep(args).run()`` trains the runs in turn (a finished run is skipped on resumption), selects each run's
checkpoint by training-domain validation and writes the report. Checkpoints are ``recipes.common.checkpoints``'
atomic ones; batches and augmentation are pure functions of ``(trial seed, step)`` (``batches.py``), so a resumed
run reaches the same result as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import ConcatDataset, DataLoader, Subset
from tqdm.auto import tqdm

from peft_gnnmoe.tuners.gnnmoe.routing_figure import plot_expert_assignments

from ..common.checkpoints import load_checkpoint, resolve_resume, save_checkpoint
from . import methods, parallel, report
from .batches import StepBatchSampler, augment, collate, normalize
from .data import image_list_digest, load_domains, make_split, seed_hash, skipped_images

# arguments that change results: a resumed sweep must use the same values
PROTOCOL_KEYS = (
    "dataset",
    "data_dir",
    "hub_dataset",
    "backbone",
    "holdout_fraction",
    "steps",
    "batch_size",
    "lr",
    "method_lr",
    "weight_decay",
    "image_size",
    "no_augment",
    "eval_every",
    "lora_r",
    "lokr_r",
    "num_experts",
    "top_k",
    "kron_rank",
    "kron_factor",
    "num_blocks",
    "graph",
    "graph_radius",
    "prefix_tokens",
)


def resume_point(run_dir: str | os.PathLike, want: str | None) -> Path | None:
    """The checkpoint one run of the sweep resumes from (``--resume_from_checkpoint`` is ``want``).

    A folder applies to the run that owns it (``<run_dir>/checkpoints/step_<N>``); every other run of the sweep
    resumes from its own latest checkpoint, as with ``"latest"``.
    """
    if want and want != "latest" and Path(want).resolve().parent.parent != Path(run_dir).resolve():
        want = "latest"
    return resolve_resume(run_dir, want)


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


class Sweep:
    """Runs every (trial seed, held-out domain, method) of the protocol and writes the results."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.method_names = methods.expand_methods(args.method, args.router)
        trackers = "tensorboard" if args.report_to == "tensorboard" and _has_tensorboard() else None
        # GNN-MoE's top-k routing often leaves an expert without tokens in a step. Its experts are stacked in one
        # Parameter per layer, so every parameter still takes part in backward and DDP needs no
        # find_unused_parameters (tests/recipes/dg/test_recipe.py trains 64 experts with top-1 routing on 2 processes).
        self.acc = Accelerator(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=trackers,
            project_dir=args.output_dir,
        )
        self.jobs = 1 if args.shard else parallel.resolve_jobs(args.jobs, self.acc.num_processes, self.acc.device.type)
        if self.jobs > 1 or args.shard:
            torch.set_num_threads(1)  # one thread per process: the same numbers as a one-thread sequential sweep
        size, self.mean, self.std = methods.image_stats(args.backbone)
        self.image_size = args.image_size or size
        if self.image_size is None:
            raise ValueError(f"Cannot read the input size of {args.backbone}; pass --image_size.")
        self.domains, self.classes, self.domain_names, self.info = load_domains(
            args.dataset,
            args.data_dir,
            args.hub_dataset,
            self.image_size,
            cache_dir=args.cache_dir,
            skip_bad_images=args.skip_bad_images,
            progress=self.acc.is_local_main_process,
            **(
                {
                    "domain_column": args.hub_domain_column,
                    "label_column": args.hub_label_column,
                    "image_column": args.hub_image_column,
                }
                if args.hub_dataset
                else {}
            ),
        )
        n = len(self.domains)
        self.test_envs = args.test_envs if args.test_envs is not None else list(range(n))
        bad = [e for e in self.test_envs if not 0 <= e < n]
        if bad:
            raise ValueError(f"--test_envs {bad} out of range: {args.dataset} has {n} domains {self.domain_names}.")
        self.hp = methods.MethodArgs(
            args.lora_r,
            args.lokr_r,
            args.num_experts,
            args.top_k,
            args.kron_rank,
            args.kron_factor,
            graph=args.graph,
            graph_radius=args.graph_radius,
            prefix_tokens=args.prefix_tokens,
            num_blocks=args.num_blocks,
        )
        self._prepare_output_dir()
        if trackers:
            self.acc.init_trackers(
                "dg",
                config={
                    k: str(v) if isinstance(v, (list, tuple, dict)) or v is None else v for k, v in vars(args).items()
                },
            )

    def _prepare_output_dir(self) -> None:
        args = self.args
        path = os.path.join(args.output_dir, "args.json")
        protocol = {k: getattr(args, k) for k in PROTOCOL_KEYS}
        images = image_list_digest(self.domains)  # the splits index these lists: a resume must read the same ones
        if images is not None:
            protocol["images"] = images
        if args.shard and not os.path.exists(path):
            raise FileNotFoundError(f"--shard joins the sweep in {args.output_dir}, but it has no args.json.")
        if os.path.exists(path):
            if not (args.resume_from_checkpoint or args.shard):
                raise FileExistsError(
                    f"{args.output_dir} already holds a sweep; pass --resume_from_checkpoint to continue it or choose "
                    "another --output_dir."
                )
            with open(path) as f:
                old = json.load(f)["protocol"]
            # "images" is compared when the sweep recorded it (sweeps started before it was recorded did not)
            diff = {k: (old.get(k), v) for k, v in protocol.items() if old.get(k) != v and (k != "images" or k in old)}
            if diff:
                raise ValueError(
                    f"Cannot resume {args.output_dir}: these arguments differ (saved, now): {diff}."
                    + (
                        " 'images': the data folder's readable images changed since the sweep started (files "
                        "added, removed, repaired or skipped), so its splits would differ; start a new sweep."
                        if "images" in diff
                        else ""
                    )
                )
        self.acc.wait_for_everyone()
        if self.acc.is_main_process and not args.shard:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(path, "w") as f:
                json.dump({"protocol": protocol, "args": vars(args)}, f, indent=2)
        self.acc.wait_for_everyone()

    def run(self) -> dict:
        args = self.args
        start = time.time()
        jobs = [(t, e, m) for t in args.trial_seeds for e in self.test_envs for m in self.method_names]
        shard, shards = args.shard or (0, self.jobs)
        workers = parallel.start_workers(args.argv, self.jobs, args.output_dir) if self.jobs > 1 else []
        try:
            bar = tqdm(jobs[shard::shards], desc="runs", disable=not self.acc.is_local_main_process)
            if workers:
                bar.write(f"{len(workers)} worker process(es) run the other runs ({args.output_dir}/workers/*.log)")
            for trial, test_env, method in bar:
                bar.set_postfix(method=method, held_out=self.domain_names[test_env], trial=trial)
                self.train_one(method, test_env, trial)
            parallel.wait_for_workers(workers)
        except BaseException:
            parallel.stop_workers(workers)
            raise
        if args.shard:
            self.acc.end_training()
            return None
        results = [self.train_one(m, e, t) for t, e, m in jobs]  # every run is finished: reads its result.json
        table = None
        if self.acc.is_main_process:
            table = report.write_report(
                args.output_dir,
                results,
                self.domain_names,
                self.method_names,
                protocol={
                    "dataset": args.dataset,
                    "backbone": args.backbone,
                    "num_blocks": args.num_blocks,
                    "image_size": self.image_size,
                    "steps": args.steps,
                    "batch_size_per_domain": args.batch_size,
                    "trial_seeds": args.trial_seeds,
                    "holdout_fraction": args.holdout_fraction,
                    "model_selection": "training-domain validation",
                    "seconds": round(time.time() - start),
                },
                skipped_images=self._skipped_record(),
            )
            print(report.markdown_table(table))
            print(f"results in {args.output_dir} ({time.time() - start:.0f}s)")
        self.acc.end_training()
        return table

    def _skipped_record(self) -> dict | None:
        """The image files left out by --skip_bad_images (``None`` when the data set is not a folder)."""
        bad = skipped_images(self.domains)
        if bad is None:
            return None
        return {"count": len(bad), "files": [b.path for b in bad], "reasons": {b.path: b.reason for b in bad}}

    # ------------------------------------------------------------------------------------------------------------
    def train_one(self, method: str, test_env: int, trial: int) -> dict:
        """One run of the protocol; returns its result (also written to ``<run_dir>/result.json``)."""
        args, acc = self.args, self.acc
        run = f"{method}/env{test_env}_trial{trial}"
        run_dir = os.path.join(args.output_dir, "runs", method, f"env{test_env}_trial{trial}")
        result_path = os.path.join(run_dir, "result.json")
        if os.path.exists(result_path):  # finished before the kill
            with open(result_path) as f:
                return json.load(f)
        resume = resume_point(run_dir, args.resume_from_checkpoint)

        split = make_split(self.domains, trial, args.holdout_fraction)
        sources = [i for i in range(len(self.domains)) if i != test_env]
        set_seed(seed_hash("init", trial, test_env))  # same head initialisation for every method
        model = methods.build_model(method, args.backbone, self.classes, self.hp)
        trainable, total = methods.count_parameters(model)
        base = methods.base_method(method)
        lr = args.lr or args.method_lr.get(base) or methods.DEFAULT_LR[base]
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=args.weight_decay
        )
        model, optimizer = acc.prepare(model, optimizer)
        loaders = {f"env{i}_out": self._loader(split.held_out[i]) for i in sources}
        loaders[f"env{test_env}_in"] = self._loader(split.train[test_env])

        step, records, loss_sum, loss_n = 0, [], 0.0, 0
        if resume:
            state = load_checkpoint(acc, resume)
            step, records, loss_sum, loss_n = state["step"], state["records"], state["loss_sum"], state["loss_n"]

        sampler = StepBatchSampler(
            [len(split.train[i]) for i in sources],
            args.batch_size,
            args.steps,
            seed=trial,
            start_step=step,
            accumulation=args.gradient_accumulation_steps,
            num_processes=acc.num_processes,
            rank=acc.process_index,
        )
        train_loader = DataLoader(
            ConcatDataset([split.train[i] for i in sources]),
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=args.num_workers,
        )
        batches = iter(train_loader)
        t0 = time.time()
        bar = tqdm(total=args.steps, initial=step, desc=run, leave=False, disable=not acc.is_local_main_process)
        while step < args.steps:
            model.train()
            for micro in range(args.gradient_accumulation_steps):
                images, labels = next(batches)
                # router noise / dropout draw from the global RNG: seed it per micro-step so a resumed run matches
                torch.manual_seed(seed_hash("forward", trial, step, micro, acc.process_index))
                with acc.accumulate(model):
                    loss = self.training_loss(model, images, labels, trial, step, sampler.positions(micro))
                    acc.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                loss_sum += loss.item() / args.gradient_accumulation_steps
            loss_n += 1
            step += 1
            bar.update()
            if step % args.eval_every == 0 or step == args.steps:
                records.append(self._record(model, loaders, step, sources, test_env, loss_sum, loss_n, run))
                bar.set_postfix(val=f"{records[-1]['val_acc']:.3f}", test=f"{records[-1]['test_acc']:.3f}")
                loss_sum, loss_n = 0.0, 0
            if step % args.checkpointing_steps == 0 and step < args.steps:
                save_checkpoint(
                    acc,
                    run_dir,
                    step,
                    {"step": step, "records": records, "loss_sum": loss_sum, "loss_n": loss_n},
                    args.checkpoints_total_limit,
                )
        bar.close()

        best = max(records, key=lambda r: r["val_acc"])  # first of equals: earliest step
        result = {
            "method": method,
            "test_env": test_env,
            "test_domain": self.domain_names[test_env],
            "trial": trial,
            "lr": lr,
            "trainable_params": trainable,
            "total_params": total,
            "selected_step": best["step"],
            "val_acc": best["val_acc"],
            "test_acc": best["test_acc"],
            "last_test_acc": records[-1]["test_acc"],
            "train_seconds": round(time.time() - t0, 1),
            "num_processes": acc.num_processes,
            "records": records,
        }
        acc.wait_for_everyone()
        unwrapped = acc.unwrap_model(model)
        if acc.is_main_process:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "records.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            if args.save_adapters:
                unwrapped.save_pretrained(os.path.join(run_dir, "model"))
            if method.startswith("gnnmoe") and trial == args.trial_seeds[0] and args.routing_images > 0:
                self._routing_picture(unwrapped, split.train[test_env], method, test_env)
            with open(result_path + ".tmp", "w") as f:
                json.dump(result, f, indent=1)
            os.replace(result_path + ".tmp", result_path)  # result.json marks the run done
            if not args.keep_checkpoints:
                shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
        acc.wait_for_everyone()
        acc.free_memory()
        del model, optimizer, unwrapped
        return result

    def training_loss(self, model, images, labels, trial: int, step: int, positions: slice) -> torch.Tensor:
        """The loss of one micro-batch: moved to the model's device, augmented (as a function of ``(trial, step)``
        and the examples' positions in the global batch), normalised and classified."""
        device = model_device(model)
        images, labels = images.to(device), labels.to(device)
        if self.args.no_augment:
            x = images.float() / 255.0
        else:
            global_size = self.args.batch_size * (len(self.domains) - 1)
            hflip = self.info.hflip if self.info else True
            x = augment(images, trial, step, global_size, positions, hflip)
        return model(pixel_values=normalize(x, self.mean, self.std), labels=labels).loss

    def _loader(self, subset: Subset):
        loader = DataLoader(
            subset,
            batch_size=self.args.eval_batch_size,
            shuffle=False,
            collate_fn=collate,
            num_workers=self.args.num_workers,
        )
        return self.acc.prepare(loader)

    def _record(self, model, loaders, step, sources, test_env, loss_sum, loss_n, run) -> dict:
        acc = self.acc
        loss = acc.reduce(torch.tensor(loss_sum / max(loss_n, 1), device=acc.device), reduction="mean").item()
        rec = {"step": step, "train_loss": loss}
        for key, loader in loaders.items():
            rec[f"{key}_acc"], rec[f"{key}_n"] = evaluate(acc, model, loader, self.mean, self.std, key)
        rec["val_acc"] = sum(rec[f"env{i}_out_acc"] for i in sources) / len(sources)
        rec["test_acc"] = rec[f"env{test_env}_in_acc"]
        entropy = methods.routing_entropy(acc.unwrap_model(model))
        if entropy is not None:
            rec["routing_entropy"] = entropy
        acc.log({f"{run}/{k}": v for k, v in rec.items() if k != "step" and not k.endswith("_n")}, step=step)
        return rec

    @torch.no_grad()
    def _routing_picture(self, model, test_split: Subset, method: str, test_env: int) -> None:
        n = min(self.args.routing_images, len(test_split))
        images = torch.stack([test_split[i][0] for i in range(n)]).to(model_device(model))
        model.eval()
        model(pixel_values=normalize(images.float() / 255.0, self.mean, self.std))
        assignments = methods.routing_assignments(model)
        if assignments:
            path = os.path.join(self.args.output_dir, "routing", f"{method}_{self.domain_names[test_env]}.png")
            plot_expert_assignments(
                images.cpu(),
                assignments,
                path,
                title=f"{method}: top-1 expert per patch, held-out domain {self.domain_names[test_env]!r}",
            )


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True

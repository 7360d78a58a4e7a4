"""The DG sweep: every (trial seed, held-out domain, method) of the protocol, trained and evaluated under Accelerate.

``Sweep(cfg).run()`` (``cfg`` a ``config.DGRunConfig``) trains the runs in turn (a finished run is skipped on
resumption), selects each run's checkpoint by training-domain validation and writes the report. ``train_one`` is one
run: build, resume, train (evaluating and checkpointing), finish. Checkpoints are ``recipes.common.checkpoints``'
atomic ones; batches and augmentation are pure functions of ``(trial seed, step)`` (``batches.py``), so a resumed
run reaches the same result as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import ConcatDataset, DataLoader, Subset
from tqdm.auto import tqdm

from peft_gnnmoe.tuners.gnnmoe.routing_figure import plot_expert_assignments

from ..common.checkpoints import load_checkpoint, save_checkpoint
from ..common.options import mixed_precision
from . import methods, parallel, report
from .batches import StepBatchSampler, augment, collate, normalize
from .config import DRY_RUN_EVAL_IMAGES, DGRunConfig
from .data import image_list_digest, load_domains, make_split, seed_hash, skipped_images
from .evaluation import evaluate, model_device
from .resume import check_resumable, resume_point, write_args_json


@dataclass(frozen=True)
class Run:
    """One (method, held-out domain, trial seed) of the sweep, and its folder."""

    method: str
    test_env: int
    trial: int
    dir: str

    @property
    def name(self) -> str:
        return f"{self.method}/env{self.test_env}_trial{self.trial}"


@dataclass
class RunState:
    """What a run's checkpoint keeps: the step reached, the evaluations so far and the loss since the last one."""

    step: int = 0
    records: list[dict] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_n: int = 0


class Sweep:
    """Runs every (trial seed, held-out domain, method) of the protocol and writes the results."""

    def __init__(self, cfg: DGRunConfig):
        self.cfg = cfg
        data, execution = cfg.data, cfg.execution
        self.method_names = cfg.model.method_names
        trackers = "tensorboard" if execution.report_to == "tensorboard" and _has_tensorboard() else None
        # GNN-MoE's top-k routing often leaves an expert without tokens in a step. Its experts are stacked in one
        # Parameter per layer, so every parameter still takes part in backward and DDP needs no
        # find_unused_parameters (tests/recipes/dg/test_recipe.py trains 64 experts with top-1 routing on 2 processes).
        self.acc = Accelerator(
            mixed_precision=mixed_precision(execution.mixed_precision),
            gradient_accumulation_steps=execution.gradient_accumulation_steps,
            log_with=trackers,
            project_dir=execution.output_dir,
        )
        shard = execution.shard
        self.jobs = 1 if shard else parallel.resolve_jobs(execution.jobs, self.acc.num_processes, self.acc.device.type)
        if self.jobs > 1 or shard:
            torch.set_num_threads(1)  # one thread per process: the same numbers as a one-thread sequential sweep
        size, self.mean, self.std = methods.image_stats(cfg.model.backbone)
        self.image_size = data.image_size or size
        if self.image_size is None:
            raise ValueError(f"Cannot read the input size of {cfg.model.backbone}; pass --image_size.")
        self.domains, self.classes, self.domain_names, self.info = load_domains(
            data.dataset,
            data.data_dir,
            data.hub_dataset,
            self.image_size,
            cache_dir=data.cache_dir,
            skip_bad_images=data.skip_bad_images,
            progress=self.acc.is_local_main_process,
            **(
                {
                    "domain_column": data.hub_domain_column,
                    "label_column": data.hub_label_column,
                    "image_column": data.hub_image_column,
                }
                if data.hub_dataset
                else {}
            ),
        )
        n = len(self.domains)
        self.test_envs = data.test_envs if data.test_envs is not None else list(range(n))
        bad = [e for e in self.test_envs if not 0 <= e < n]
        if bad:
            raise ValueError(f"--test_envs {bad} out of range: {data.dataset} has {n} domains {self.domain_names}.")
        self.hp = cfg.model.method_args()
        self._prepare_output_dir()
        if trackers:
            self.acc.init_trackers(
                "dg",
                config={
                    k: str(v) if isinstance(v, (list, tuple, dict)) or v is None else v for k, v in cfg.flat().items()
                },
            )

    def _prepare_output_dir(self) -> None:
        """Checks that the sweep may write to ``--output_dir`` (a new one, or the same protocol) and records it."""
        execution = self.cfg.execution
        protocol = self.cfg.protocol()
        images = image_list_digest(self.domains)  # the splits index these lists: a resume must read the same ones
        if images is not None:
            protocol["images"] = images
        if execution.shard and not os.path.exists(os.path.join(execution.output_dir, "args.json")):
            raise FileNotFoundError(f"--shard joins the sweep in {execution.output_dir}, but it has no args.json.")
        check_resumable(execution.output_dir, protocol, bool(execution.resume_from_checkpoint or execution.shard))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process and not execution.shard:
            write_args_json(execution.output_dir, protocol, self.cfg.flat())
        self.acc.wait_for_everyone()

    def run(self) -> dict:
        execution, training = self.cfg.execution, self.cfg.training
        start = time.time()
        jobs = [(t, e, m) for t in training.seeds for e in self.test_envs for m in self.method_names]
        shard, shards = execution.shard or (0, self.jobs)
        workers = parallel.start_workers(execution.argv, self.jobs, execution.output_dir) if self.jobs > 1 else []
        try:
            bar = tqdm(jobs[shard::shards], desc="runs", disable=not self.acc.is_local_main_process)
            if workers:
                bar.write(
                    f"{len(workers)} worker process(es) run the other runs ({execution.output_dir}/workers/*.log)"
                )
            for trial, test_env, method in bar:
                bar.set_postfix(method=method, held_out=self.domain_names[test_env], trial=trial)
                self.train_one(method, test_env, trial)
            parallel.wait_for_workers(workers)
        except BaseException:
            parallel.stop_workers(workers)
            raise
        if execution.shard:
            self.acc.end_training()
            return None
        results = [self.train_one(m, e, t) for t, e, m in jobs]  # every run is finished: reads its result.json
        table = None
        if self.acc.is_main_process:
            table = report.write_report(
                execution.output_dir,
                results,
                self.domain_names,
                self.method_names,
                protocol={  # results.json's record (its key names are those of the published results)
                    "dataset": self.cfg.data.dataset,
                    "backbone": self.cfg.model.backbone,
                    "num_blocks": self.cfg.model.num_blocks,
                    "image_size": self.image_size,
                    "steps": training.max_steps,
                    "batch_size_per_domain": training.batch_size,
                    "trial_seeds": training.seeds,
                    "holdout_fraction": self.cfg.data.holdout_fraction,
                    "model_selection": "training-domain validation",
                    "seconds": round(time.time() - start),
                },
                skipped_images=self._skipped_record(),
            )
            print(report.markdown_table(table))
            print(f"results in {execution.output_dir} ({time.time() - start:.0f}s)")
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
        run_dir = os.path.join(self.cfg.execution.output_dir, "runs", method, f"env{test_env}_trial{trial}")
        run = Run(method, test_env, trial, run_dir)
        result_path = os.path.join(run_dir, "result.json")
        if os.path.exists(result_path):  # finished before the kill
            with open(result_path) as f:
                return json.load(f)
        checkpoint = resume_point(run_dir, self.cfg.execution.resume_from_checkpoint)
        split = make_split(self.domains, trial, self.cfg.data.holdout_fraction)
        model, optimizer, loaders, params = self._build(run, split)
        state = self._load_state(checkpoint)
        start = time.time()
        self._train(run, model, optimizer, split, loaders, state)
        result = self._result(run, state.records, params, time.time() - start)
        self._finish(run, model, split, result)
        del model, optimizer
        return result

    def _build(self, run: Run, split) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict, tuple[int, int]]:
        """The run's model and optimizer, prepared, with its evaluation loaders and ``(trainable, total)``
        parameter counts; the head's initialisation depends on the trial seed and held-out domain only."""
        set_seed(seed_hash("init", run.trial, run.test_env))  # same head initialisation for every method
        model = methods.build_model(run.method, self.cfg.model.backbone, self.classes, self.hp)
        params = methods.count_parameters(model)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=self.cfg.training.learning_rate(run.method),
            weight_decay=self.cfg.training.weight_decay,
        )
        model, optimizer = self.acc.prepare(model, optimizer)
        loaders = {f"env{i}_out": self._loader(split.held_out[i]) for i in self._sources(run)}
        loaders[f"env{run.test_env}_in"] = self._loader(split.train[run.test_env])
        return model, optimizer, loaders, params

    def _load_state(self, checkpoint: Path | None) -> RunState:
        """Loads the prepared model's and optimizer's state from ``checkpoint``; returns the run's state there (a
        fresh state without one)."""
        if checkpoint is None:
            return RunState()
        state = load_checkpoint(self.acc, checkpoint)
        return RunState(state["step"], state["records"], state["loss_sum"], state["loss_n"])

    def _sources(self, run: Run) -> list[int]:
        return [i for i in range(len(self.domains)) if i != run.test_env]

    def _train(self, run: Run, model, optimizer, split, loaders, state: RunState) -> None:
        """Trains from ``state.step`` to ``--max_steps``, evaluating every ``--eval_every`` steps and checkpointing
        every ``--checkpointing_steps``; ``state`` follows along."""
        acc, training, execution = self.acc, self.cfg.training, self.cfg.execution
        sources = self._sources(run)
        accumulation = execution.gradient_accumulation_steps
        sampler = StepBatchSampler(
            [len(split.train[i]) for i in sources],
            training.batch_size,
            training.max_steps,
            seed=run.trial,
            start_step=state.step,
            accumulation=accumulation,
            num_processes=acc.num_processes,
            rank=acc.process_index,
        )
        train_loader = DataLoader(
            ConcatDataset([split.train[i] for i in sources]),
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=execution.num_workers,
        )
        batches = iter(train_loader)
        bar = tqdm(
            total=training.max_steps,
            initial=state.step,
            desc=run.name,
            leave=False,
            disable=not acc.is_local_main_process,
        )
        while state.step < training.max_steps:
            model.train()
            for micro in range(accumulation):
                images, labels = next(batches)
                # router noise / dropout draw from the global RNG: seed it per micro-step so a resumed run matches
                torch.manual_seed(seed_hash("forward", run.trial, state.step, micro, acc.process_index))
                with acc.accumulate(model):
                    loss = self.training_loss(model, images, labels, run.trial, state.step, sampler.positions(micro))
                    acc.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                state.loss_sum += loss.item() / accumulation
            state.loss_n += 1
            state.step += 1
            bar.update()
            if state.step % training.eval_every == 0 or state.step == training.max_steps:
                state.records.append(self._record(model, loaders, state, sources, run))
                bar.set_postfix(val=f"{state.records[-1]['val_acc']:.3f}", test=f"{state.records[-1]['test_acc']:.3f}")
                state.loss_sum, state.loss_n = 0.0, 0
            if state.step % execution.checkpointing_steps == 0 and state.step < training.max_steps:
                save_checkpoint(acc, run.dir, state.step, asdict(state), execution.checkpoints_total_limit)
        bar.close()

    def _result(self, run: Run, records: list[dict], params: tuple[int, int], seconds: float) -> dict:
        """The run's result: the evaluation selected by training-domain validation, and every evaluation."""
        best = max(records, key=lambda r: r["val_acc"])  # first of equals: earliest step
        return {
            "method": run.method,
            "test_env": run.test_env,
            "test_domain": self.domain_names[run.test_env],
            "trial": run.trial,
            "lr": self.cfg.training.learning_rate(run.method),
            "trainable_params": params[0],
            "total_params": params[1],
            "selected_step": best["step"],
            "val_acc": best["val_acc"],
            "test_acc": best["test_acc"],
            "last_test_acc": records[-1]["test_acc"],
            "train_seconds": round(seconds, 1),
            "num_processes": self.acc.num_processes,
            "records": records,
        }

    def _finish(self, run: Run, model, split, result: dict) -> None:
        """Writes the run's records, model and routing picture (on request) and, last, ``result.json``, which marks
        the run done; then drops its checkpoints (unless ``--keep_checkpoints``)."""
        acc, execution = self.acc, self.cfg.execution
        acc.wait_for_everyone()
        unwrapped = acc.unwrap_model(model)
        if acc.is_main_process:
            os.makedirs(run.dir, exist_ok=True)
            with open(os.path.join(run.dir, "records.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in result["records"])
            if execution.save_adapters:
                unwrapped.save_pretrained(os.path.join(run.dir, "model"))
            first_trial = run.trial == self.cfg.training.seeds[0]
            if run.method.startswith("gnnmoe") and first_trial and execution.routing_images > 0:
                self._routing_picture(unwrapped, split.train[run.test_env], run.method, run.test_env)
            result_path = os.path.join(run.dir, "result.json")
            with open(result_path + ".tmp", "w") as f:
                json.dump(result, f, indent=1)
            os.replace(result_path + ".tmp", result_path)  # result.json marks the run done
            if not execution.keep_checkpoints:
                shutil.rmtree(os.path.join(run.dir, "checkpoints"), ignore_errors=True)
        acc.wait_for_everyone()
        acc.free_memory()

    def training_loss(self, model, images, labels, trial: int, step: int, positions: slice) -> torch.Tensor:
        """The loss of one micro-batch: moved to the model's device, augmented (as a function of ``(trial, step)``
        and the examples' positions in the global batch), normalised and classified."""
        device = model_device(model)
        images, labels = images.to(device), labels.to(device)
        if self.cfg.data.no_augment:
            x = images.float() / 255.0
        else:
            global_size = self.cfg.training.batch_size * (len(self.domains) - 1)
            hflip = self.info.hflip if self.info else True
            x = augment(images, trial, step, global_size, positions, hflip)
        return model(pixel_values=normalize(x, self.mean, self.std), labels=labels).loss

    def _loader(self, subset: Subset):
        if self.cfg.execution.dry_run:  # a set-up check: the first images of each split show that evaluation runs
            subset = Subset(subset, range(min(len(subset), DRY_RUN_EVAL_IMAGES)))
        loader = DataLoader(
            subset,
            batch_size=self.cfg.execution.eval_batch_size,
            shuffle=False,
            collate_fn=collate,
            num_workers=self.cfg.execution.num_workers,
        )
        return self.acc.prepare(loader)

    def _record(self, model, loaders, state: RunState, sources: list[int], run: Run) -> dict:
        """One evaluation: the mean training loss since the last, and accuracy on every evaluation loader."""
        acc = self.acc
        mean_loss = torch.tensor(state.loss_sum / max(state.loss_n, 1), device=acc.device)
        rec = {"step": state.step, "train_loss": acc.reduce(mean_loss, reduction="mean").item()}
        for key, loader in loaders.items():
            rec[f"{key}_acc"], rec[f"{key}_n"] = evaluate(acc, model, loader, self.mean, self.std, key)
        rec["val_acc"] = sum(rec[f"env{i}_out_acc"] for i in sources) / len(sources)
        rec["test_acc"] = rec[f"env{run.test_env}_in_acc"]
        entropy = methods.routing_entropy(acc.unwrap_model(model))
        if entropy is not None:
            rec["routing_entropy"] = entropy
        acc.log(
            {f"{run.name}/{k}": v for k, v in rec.items() if k != "step" and not k.endswith("_n")}, step=state.step
        )
        return rec

    @torch.no_grad()
    def _routing_picture(self, model, test_split: Subset, method: str, test_env: int) -> None:
        n = min(self.cfg.execution.routing_images, len(test_split))
        images = torch.stack([test_split[i][0] for i in range(n)]).to(model_device(model))
        model.eval()
        model(pixel_values=normalize(images.float() / 255.0, self.mean, self.std))
        assignments = methods.routing_assignments(model)
        if assignments:
            path = os.path.join(
                self.cfg.execution.output_dir, "routing", f"{method}_{self.domain_names[test_env]}.png"
            )
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

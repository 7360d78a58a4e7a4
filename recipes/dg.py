"""Domain generalization of ViT adapters with DomainBed's protocol, under Accelerate.

    accelerate launch recipes/dg.py            # embedded digits benchmark: offline, every method, 4 domains, 3 seeds
    accelerate launch recipes/dg.py --dataset PACS --data_dir /data/PACS \\
        --backbone google/vit-base-patch16-224-in21k --method gnnmoe --router gat --test_envs 0 1 2 3 \\
        --output_dir runs/pacs
    accelerate launch --num_processes 8 recipes/dg.py ...   # DDP; FSDP/DeepSpeed through `accelerate config`
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/dg.py   # DDP over CPU processes

Protocol (Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021): every domain listed in
--test_envs is held out in turn and the model trains on the others (leave-one-domain-out). Each domain is split with
a seeded 80/20 shuffle; the model is evaluated every --eval_every steps and the evaluation with the best accuracy on
the training domains' 20% splits is selected (training-domain validation); its accuracy on the held-out domain's 80%
split is reported. Each method runs for every held-out domain and every trial seed with the same steps, batches and
augmentation; the table gives mean ± std over trial seeds per domain and their average.

Outputs in --output_dir: results.json and results.md (the table), curves.png (learning curves), chart.png,
routing/*.png (each patch's chosen expert, per layer, for GNN-MoE), runs/<method>/env<i>_trial<s>/ (records.jsonl
with every evaluation, result.json, checkpoints), and TensorBoard logs when tensorboard is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dg_methods  # noqa: E402
import dg_report  # noqa: E402
from dg_batches import StepBatchSampler, augment, collate, normalize  # noqa: E402
from dg_data import DATASETS, EMBEDDED, load_domains, seed_hash, split_indices  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED_BACKBONE = os.path.join(REPO, "assets", "vit-tiny-fashion-contours")
HUB_BACKBONE = "google/vit-base-patch16-224-in21k"
# arguments that change results: a resumed sweep must use the same values
_PROTOCOL_KEYS = (
    "dataset",
    "data_dir",
    "hub_dataset",
    "backbone",
    "holdout_fraction",
    "steps",
    "batch_size",
    "lr",
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
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="recipes/dg.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--dataset",
        default=EMBEDDED,
        help=f"One of {sorted(DATASETS)} (default {EMBEDDED}: built from installed packages, no download), "
        "or any name with --data_dir (domains = its subfolders) or --hub_dataset.",
    )
    d.add_argument(
        "--data_dir",
        help="Folder laid out as <data_dir>/<domain>/<class>/<image>, domain folders named "
        "as in DomainBed (e.g. PACS: art_painting cartoon photo sketch).",
    )
    d.add_argument(
        "--hub_dataset",
        help="A data set id (or local path) for datasets.load_dataset, with one row per "
        "image and a column naming its domain; all splits are concatenated.",
    )
    d.add_argument("--hub_domain_column", default="domain", help="--hub_dataset column naming the domain.")
    d.add_argument("--hub_label_column", default="label", help="--hub_dataset column with the class.")
    d.add_argument("--hub_image_column", default="image", help="--hub_dataset column with the image.")
    d.add_argument("--cache_dir", help="Cache folder for `datasets` (default: its own).")
    d.add_argument(
        "--test_envs",
        type=int,
        nargs="+",
        help="Indices of the domains to hold out, each in turn (default: every domain).",
    )
    d.add_argument("--holdout_fraction", type=float, default=0.2, help="Per-domain held-out share (default 0.2).")
    d.add_argument("--image_size", type=int, help="Input size (default: the backbone's).")
    d.add_argument("--no_augment", action="store_true", help="Disable the training augmentation.")

    m = p.add_argument_group("model and methods")
    m.add_argument(
        "--backbone",
        help="Checkpoint for AutoModelForImageClassification.from_pretrained (default: the "
        f"repo's assets/vit-tiny-fashion-contours for {EMBEDDED}, {HUB_BACKBONE} otherwise).",
    )
    m.add_argument(
        "--method",
        nargs="+",
        default=list(dg_methods.METHODS),
        choices=dg_methods.METHODS,
        help="Methods to compare (default: all).",
    )
    m.add_argument(
        "--router",
        nargs="+",
        default=list(dg_methods.ROUTERS),
        choices=dg_methods.ROUTERS,
        help="GNN-MoE routers, one run each (default: all).",
    )
    m.add_argument("--num_experts", type=int, default=4, help="GNN-MoE experts per adapted layer (default 4).")
    m.add_argument("--top_k", type=int, default=2, help="GNN-MoE experts per token (default 2).")
    m.add_argument("--kron_rank", type=int, default=4, help="Rank of each Kronecker expert (default 4).")
    m.add_argument("--kron_factor", type=int, default=4, help="Kronecker rule size n (default 4).")
    m.add_argument("--lora_r", type=int, default=4, help="LoRA rank, alpha = 2r (default 4).")
    m.add_argument("--lokr_r", type=int, default=4, help="LoKr rank, alpha = 2r (default 4).")

    t = p.add_argument_group("training")
    t.add_argument(
        "--trial_seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="Trial seeds; each changes the data split, the head's initialisation and the batches.",
    )
    t.add_argument(
        "--steps",
        type=int,
        help=f"Optimizer steps per run (default: 5000, DomainNet 15000, {DATASETS[EMBEDDED].steps} for {EMBEDDED}).",
    )
    t.add_argument(
        "--batch_size",
        type=int,
        help="Examples per training domain per optimizer step, over all "
        f"processes and accumulation steps (default 32; 8 for {EMBEDDED}).",
    )
    t.add_argument("--lr", type=float, help=f"AdamW learning rate (default per method: {dg_methods.DEFAULT_LR}).")
    t.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (default 0).")
    t.add_argument(
        "--eval_every",
        type=int,
        help=f"Evaluate (and log) every N steps; model selection picks among these (default 200; 100 for {EMBEDDED}).",
    )
    t.add_argument("--eval_batch_size", type=int, default=256, help="Per-process evaluation batch.")
    t.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (use some for image folders).")

    a = p.add_argument_group("accelerate")
    a.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        help="Overrides `accelerate launch`'s setting (default: the launcher's, else no).",
    )
    a.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Micro-steps per optimizer step; the batch per step stays --batch_size per domain.",
    )
    a.add_argument(
        "--checkpointing_steps", type=int, help="Save the training state every N steps (default: --eval_every)."
    )
    a.add_argument("--checkpoints_total_limit", type=int, default=1, help="Checkpoints kept per run (default 1).")
    a.add_argument("--keep_checkpoints", action="store_true", help="Keep a run's checkpoints after it finishes.")
    a.add_argument(
        "--resume_from_checkpoint",
        nargs="?",
        const="latest",
        help="Continue a killed sweep in --output_dir: finished runs are kept, unfinished ones resume "
        "from their latest checkpoint ('latest', the default) or from the given checkpoint folder.",
    )
    a.add_argument(
        "--report_to",
        default="tensorboard",
        choices=["tensorboard", "none"],
        help="Tracker for accelerate's logging (skipped when tensorboard is not installed).",
    )
    a.add_argument("--output_dir", help="Where results go (default runs/dg-<dataset>).")
    a.add_argument("--routing_images", type=int, default=4, help="Held-out images per routing picture (0: none).")
    a.add_argument("--save_adapters", action="store_true", help="save_pretrained every run's final model.")
    args = p.parse_args(argv)
    return resolve_defaults(args)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    info = DATASETS.get(args.dataset)
    embedded = args.dataset == EMBEDDED
    args.backbone = args.backbone or (EMBEDDED_BACKBONE if embedded else HUB_BACKBONE)
    args.steps = args.steps or (info.steps if info else 5000)
    args.batch_size = args.batch_size or (8 if embedded else 32)
    args.eval_every = args.eval_every or (100 if embedded else 200)
    args.checkpointing_steps = args.checkpointing_steps or args.eval_every
    args.output_dir = args.output_dir or os.path.join("runs", f"dg-{args.dataset}")
    if embedded and not os.path.isdir(args.backbone):
        raise FileNotFoundError(
            f"The embedded benchmark's backbone {args.backbone} is missing; regenerate it with "
            "`python scripts/pretrain_backbone.py` or pass --backbone."
        )
    for name in ("steps", "batch_size", "eval_every", "checkpointing_steps", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    return args


def image_stats(backbone: str) -> tuple[int | None, list[float], list[float]]:
    """Input size, mean and std from the backbone's preprocessor config (ViT-style defaults when absent)."""
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        cfg, _ = ImageProcessingMixin.get_image_processor_dict(backbone)
    except OSError:
        cfg = {}
    size = cfg.get("size")
    size = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    return size, list(cfg.get("image_mean", [0.5] * 3)), list(cfg.get("image_std", [0.5] * 3))


@dataclass
class Split:
    """One trial's DomainBed split of every domain."""

    train: list[Subset]  # 80% of each domain
    held_out: list[Subset]  # 20% of each domain


def make_split(domains, trial: int, holdout_fraction: float) -> Split:
    train, held = [], []
    for i, dom in enumerate(domains):
        in_idx, out_idx = split_indices(len(dom), holdout_fraction, seed_hash(trial, i))
        train.append(Subset(dom, in_idx.tolist()))
        held.append(Subset(dom, out_idx.tolist()))
    return Split(train, held)


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, loader, mean, std, desc: str) -> tuple[float, int]:
    """Accuracy over a prepared loader; ``gather_for_metrics`` drops the samples padded for even sharding."""
    model.eval()
    correct = total = 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        logits = model(pixel_values=normalize(images.float() / 255.0, mean, std)).logits
        preds, labels = accelerator.gather_for_metrics((logits.argmax(-1), labels))
        correct += (preds == labels).sum().item()
        total += labels.numel()
    return correct / max(total, 1), total


def checkpoint_dirs(run_dir: str) -> list[str]:
    """A run's complete checkpoints (``checkpoints/step_<N>``), oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit())
    return [os.path.join(root, f"step_{s}") for s in steps]


def save_checkpoint(accelerator: Accelerator, run_dir: str, step: int, state: dict, limit: int) -> None:
    """``accelerator.save_state`` into a temporary folder renamed when complete: a kill never leaves half a
    checkpoint under the final name."""
    final = os.path.join(run_dir, "checkpoints", f"step_{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


class Sweep:
    """Runs every (trial seed, held-out domain, method) of the protocol and writes the results."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.methods = dg_methods.expand_methods(args.method, args.router)
        if any(m.startswith("gnnmoe") for m in self.methods) and not dg_methods.gnnmoe_available():
            raise ImportError("--method gnnmoe needs peft_gnnmoe.GNNMoEConfig: install this repo (pip install -e .).")
        trackers = "tensorboard" if args.report_to == "tensorboard" and _has_tensorboard() else None
        # GNN-MoE's top-k routing often leaves an expert without tokens in a step. Its experts are stacked in one
        # Parameter per layer, so every parameter still takes part in backward and DDP needs no
        # find_unused_parameters (tests/test_dg_recipe.py trains 64 experts with top-1 routing on 2 processes).
        self.acc = Accelerator(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=trackers,
            project_dir=args.output_dir,
        )
        size, self.mean, self.std = image_stats(args.backbone)
        self.image_size = args.image_size or size
        if self.image_size is None:
            raise ValueError(f"Cannot read the input size of {args.backbone}; pass --image_size.")
        self.domains, self.classes, self.domain_names, self.info = load_domains(
            args.dataset,
            args.data_dir,
            args.hub_dataset,
            self.image_size,
            cache_dir=args.cache_dir,
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
        self.hp = dg_methods.MethodArgs(
            args.lora_r, args.lokr_r, args.num_experts, args.top_k, args.kron_rank, args.kron_factor
        )
        self._prepare_output_dir()
        if trackers:
            self.acc.init_trackers(
                "dg",
                config={k: str(v) if isinstance(v, (list, tuple)) or v is None else v for k, v in vars(args).items()},
            )

    def _prepare_output_dir(self) -> None:
        args = self.args
        path = os.path.join(args.output_dir, "args.json")
        protocol = {k: getattr(args, k) for k in _PROTOCOL_KEYS}
        if os.path.exists(path):
            if not args.resume_from_checkpoint:
                raise FileExistsError(
                    f"{args.output_dir} already holds a sweep; pass --resume_from_checkpoint to continue it or choose "
                    "another --output_dir."
                )
            with open(path) as f:
                old = json.load(f)["protocol"]
            diff = {k: (old.get(k), v) for k, v in protocol.items() if old.get(k) != v}
            if diff:
                raise ValueError(f"Cannot resume {args.output_dir}: these arguments differ (saved, now): {diff}.")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(path, "w") as f:
                json.dump({"protocol": protocol, "args": vars(args)}, f, indent=2)
        self.acc.wait_for_everyone()

    def run(self) -> dict:
        args, results = self.args, []
        start = time.time()
        jobs = [(t, e, m) for t in args.trial_seeds for e in self.test_envs for m in self.methods]
        bar = tqdm(jobs, desc="runs", disable=not self.acc.is_local_main_process)
        for trial, test_env, method in bar:
            bar.set_postfix(method=method, held_out=self.domain_names[test_env], trial=trial)
            results.append(self.train_one(method, test_env, trial))
        table = None
        if self.acc.is_main_process:
            table = dg_report.write_report(
                args.output_dir,
                results,
                self.domain_names,
                self.methods,
                protocol={
                    "dataset": args.dataset,
                    "backbone": args.backbone,
                    "steps": args.steps,
                    "batch_size_per_domain": args.batch_size,
                    "trial_seeds": args.trial_seeds,
                    "holdout_fraction": args.holdout_fraction,
                    "model_selection": "training-domain validation",
                    "seconds": round(time.time() - start),
                },
            )
            print(dg_report.markdown_table(table))
            print(f"results in {args.output_dir} ({time.time() - start:.0f}s)")
        self.acc.end_training()
        return table

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
        resume = self._resume_point(run_dir)

        split = make_split(self.domains, trial, args.holdout_fraction)
        sources = [i for i in range(len(self.domains)) if i != test_env]
        set_seed(seed_hash("init", trial, test_env))  # same head initialisation for every method
        model = dg_methods.build_model(method, args.backbone, self.classes, self.hp)
        trainable, total = dg_methods.count_parameters(model)
        lr = args.lr or dg_methods.DEFAULT_LR[dg_methods.base_method(method)]
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=args.weight_decay
        )
        model, optimizer = acc.prepare(model, optimizer)
        loaders = {f"env{i}_out": self._loader(split.held_out[i]) for i in sources}
        loaders[f"env{test_env}_in"] = self._loader(split.train[test_env])

        step, records, loss_sum, loss_n = 0, [], 0.0, 0
        if resume:
            acc.load_state(resume)
            with open(os.path.join(resume, "trainer_state.json")) as f:
                state = json.load(f)
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
            torch.utils.data.ConcatDataset([split.train[i] for i in sources]),
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=args.num_workers,
        )
        batches = iter(train_loader)
        global_size = args.batch_size * len(sources)
        hflip = self.info.hflip if self.info else True
        t0 = time.time()
        bar = tqdm(total=args.steps, initial=step, desc=run, leave=False, disable=not acc.is_local_main_process)
        while step < args.steps:
            model.train()
            for micro in range(args.gradient_accumulation_steps):
                images, labels = next(batches)
                images, labels = images.to(acc.device), labels.to(acc.device)
                if args.no_augment:
                    x = images.float() / 255.0
                else:
                    x = augment(images, trial, step, global_size, sampler.positions(micro), hflip)
                # router noise / dropout draw from the global RNG: seed it per micro-step so a resumed run matches
                torch.manual_seed(seed_hash("forward", trial, step, micro, acc.process_index))
                with acc.accumulate(model):
                    loss = model(pixel_values=normalize(x, self.mean, self.std), labels=labels).loss
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

    def _resume_point(self, run_dir: str) -> str | None:
        want = self.args.resume_from_checkpoint
        if not want:
            return None
        if want != "latest":
            path = os.path.abspath(want)
            if os.path.dirname(os.path.dirname(path)) == os.path.abspath(run_dir):
                if not os.path.exists(os.path.join(path, "trainer_state.json")):
                    raise FileNotFoundError(f"{want} is not a complete checkpoint (no trainer_state.json).")
                return path
        found = checkpoint_dirs(run_dir)
        return found[-1] if found else None

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
        entropy = dg_methods.routing_entropy(acc.unwrap_model(model))
        if entropy is not None:
            rec["routing_entropy"] = entropy
        acc.log({f"{run}/{k}": v for k, v in rec.items() if k != "step" and not k.endswith("_n")}, step=step)
        return rec

    @torch.no_grad()
    def _routing_picture(self, model, test_split: Subset, method: str, test_env: int) -> None:
        n = min(self.args.routing_images, len(test_split))
        images = torch.stack([test_split[i][0] for i in range(n)]).to(self.acc.device)
        model.eval()
        model(pixel_values=normalize(images.float() / 255.0, self.mean, self.std))
        assignments = dg_methods.routing_assignments(model)
        if assignments:
            path = os.path.join(self.args.output_dir, "routing", f"{method}_{self.domain_names[test_env]}.png")
            dg_report.routing_figure(
                path,
                images.cpu(),
                assignments,
                title=f"{method}: top-1 expert per patch, held-out domain {self.domain_names[test_env]!r}",
            )


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # every run re-initialises the head: the warning would repeat 84 times
    return Sweep(parse_args(argv)).run()


if __name__ == "__main__":
    main()

"""The DG recipe (``python -m recipes.dg``) end to end on tiny real files: the leave-one-domain-out loop, outputs,
resume after a kill, and a 2-process run whose evaluation counts every held-out image exactly once."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from recipes.dg import train
from recipes.dg.data import seed_hash, split_indices

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _script_env():
    return dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH=REPO)


@pytest.fixture
def one_thread():
    """Tiny models run several times faster on one intra-op thread (no spinning on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_leave_one_domain_out_end_to_end(tiny_args, tiny_domain_sizes, tmp_path, one_thread):
    out = tmp_path / "sweep"

    def argv_for(steps):
        return tiny_args(
            out,
            "--method",
            "gnnmoe",
            "lora",
            "probe",
            "full",
            "--router",
            "gcn",
            "--max_steps",
            steps,
            "--eval_every",
            "2",
            "--seeds",
            "0",
            "1",
            "--routing_images",
            "2",
        )

    argv = argv_for("4")
    table = train.main(argv)
    domains = list(tiny_domain_sizes)
    methods = ["gnnmoe-gcn", "lora", "probe", "full"]
    assert table["domains"] == domains
    assert list(table["methods"]) == methods
    for method in methods:
        for e, test_domain in enumerate(domains):
            for trial in (0, 1):
                with open(out / "runs" / method / f"env{e}_trial{trial}" / "result.json") as f:
                    r = json.load(f)
                assert r["test_domain"] == test_domain
                rec = r["records"][-1]
                # evaluated: the held-out 20% of each training domain, and the 80% part of the held-out domain
                sources = [i for i in range(3) if i != e]
                assert sorted(k for k in rec if k.endswith("_n")) == sorted(
                    [f"env{i}_out_n" for i in sources] + [f"env{e}_in_n"]
                )
                n = list(tiny_domain_sizes.values())
                for i in sources:
                    assert rec[f"env{i}_out_n"] == len(split_indices(n[i], 0.2, seed_hash(trial, i))[1])
                assert rec[f"env{e}_in_n"] == len(split_indices(n[e], 0.2, seed_hash(trial, e))[0])
                # training-domain validation picks the record with the best mean source-domain accuracy
                best = max(r["records"], key=lambda x: x["val_acc"])
                assert r["selected_step"] == best["step"]
                assert r["test_acc"] == best["test_acc"]
                assert [x["step"] for x in r["records"]] == [2, 4]
            cell = table["methods"][method]["domains"][test_domain]
            assert cell["n"] == 2
            assert 0 <= cell["mean"] <= 100
    params = {m: table["methods"][m]["trainable_params"] for m in methods}
    assert params["probe"] == 32 * 2 + 2  # the head alone
    assert params["probe"] < params["lora"]
    assert params["lora"] < params["full"]
    assert params["probe"] < params["gnnmoe-gcn"]
    for name in ("results.json", "results.md", "curves.png", "chart.png", "routing/gnnmoe-gcn_dom_a.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert "| gnnmoe-gcn |" in md
    assert "dom_b" in md
    assert "±" in md
    assert not (out / "runs" / "lora" / "env0_trial0" / "checkpoints").exists()  # removed once a run is done

    with pytest.raises(FileExistsError, match="--resume_from_checkpoint"):
        train.main(argv)
    # resuming a finished sweep trains nothing and rebuilds the same table
    again = train.main(argv + ["--resume_from_checkpoint"])
    assert again["methods"] == table["methods"]
    with pytest.raises(ValueError, match="arguments differ"):
        train.main(argv_for("6") + ["--resume_from_checkpoint"])


@pytest.mark.slow
def test_resume_after_kill_reaches_the_same_result(tiny_args, tmp_path):
    common = [
        "--method",
        "gnnmoe",
        "--router",
        "gat",
        "--test_envs",
        "1",
        "--seeds",
        "0",
        "--max_steps",
        "60",
        "--eval_every",
        "5",
        "--checkpointing_steps",
        "5",
        "--routing_images",
        "0",
    ]
    script = ["-m", "recipes.dg"]
    ref = subprocess.run(
        [sys.executable, *script, *tiny_args(tmp_path / "ref", *common)],
        env=_script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "killed"
    run_dir = out / "runs" / "gnnmoe-gat" / "env1_trial0"
    proc = subprocess.Popen(
        [sys.executable, *script, *tiny_args(out, *common)],
        env=_script_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "step_10").exists():
        assert proc.poll() is None, f"the run ended before its second checkpoint: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "result.json").exists(), "the run finished before it could be killed"
    steps = sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").iterdir() if not p.name.endswith(".tmp"))
    assert 10 <= steps[-1] < 60

    resumed = subprocess.run(
        [sys.executable, *script, *tiny_args(out, *common), "--resume_from_checkpoint"],
        env=_script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(tmp_path / "ref" / "runs" / "gnnmoe-gat" / "env1_trial0" / "result.json") as f:
        want = json.load(f)
    with open(run_dir / "result.json") as f:
        got = json.load(f)
    assert len(got["records"]) == 12
    for a, b in zip(got["records"], want["records"]):
        assert a == b  # bit-identical accuracies and losses at every evaluation
    assert got["selected_step"] == want["selected_step"]
    assert got["test_acc"] == want["test_acc"]


@pytest.mark.distributed
def test_two_processes_count_every_sample_once(tiny_args, tiny_domain_sizes, tmp_path):
    """DDP over 2 CPU processes (gloo): evaluation counts, and GNN-MoE with 64 experts and top-1 routing (most experts
    get no token in a micro-batch) trains without DDP's unused-parameter error."""
    out = tmp_path / "ddp"
    # on a machine without GPUs, `--multi_gpu` only means "start the processes with torchrun"; ACCELERATE_USE_CPU makes
    # accelerate set up DDP over gloo on the CPU (`--cpu` alone would start a single process)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "recipes.dg",
        *tiny_args(
            out,
            "--method",
            "gnnmoe",
            "lora",
            "--router",
            "sage",
            "--num_experts",
            "64",
            "--top_k",
            "1",
            "--test_envs",
            "0",
            "--seeds",
            "0",
            "--max_steps",
            "4",
            "--eval_every",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--routing_images",
            "0",
            "--eval_batch_size",
            "3",
        ),
    ]
    res = subprocess.run(
        cmd, env=_script_env() | {"ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-4000:]
    n = list(tiny_domain_sizes.values())
    for method in ("gnnmoe-sage", "lora"):
        with open(out / "runs" / method / "env0_trial0" / "result.json") as f:
            r = json.load(f)
        assert r["num_processes"] == 2
        for rec in r["records"]:
            # 11, 3, 3 samples over 2 processes with batches of 3: shards are padded, gather_for_metrics trims them
            assert rec["env0_in_n"] == len(split_indices(n[0], 0.2, seed_hash(0, 0))[0])
            assert rec["env0_in_n"] == 11
            assert rec["env1_out_n"] == 3
            assert rec["env2_out_n"] == 3


@pytest.mark.slow
def test_compare_pairs_runs_of_several_output_folders(tiny_args, tiny_domain_sizes, tmp_path, one_thread):
    from recipes.dg import compare

    common = ["--router", "gcn", "--max_steps", "2", "--eval_every", "2", "--seeds", "0", "1"]
    common += ["--routing_images", "0", "--jobs", "1"]
    train.main(tiny_args(tmp_path / "a", "--method", "gnnmoe", "lora", *common))
    train.main(tiny_args(tmp_path / "b", "--method", "gnnmoe", "--graph", "radius", *common))
    specs = [f"knn+grid={tmp_path / 'a'}:gnnmoe-gcn", f"radius={tmp_path / 'b'}", f"lora={tmp_path / 'a'}:lora"]
    table = compare.main([*specs, "--output", str(tmp_path / "cmp")])
    assert list(table["methods"]) == ["knn+grid", "radius", "lora"]
    assert table["domains"] == list(tiny_domain_sizes)

    def accuracies(folder, method):
        runs = (tmp_path / folder / "runs" / method).glob("*/result.json")
        return {p.parent.name: 100 * json.loads(p.read_text())["test_acc"] for p in runs}

    reference = accuracies("a", "gnnmoe-gcn")
    for row, (folder, method) in zip(table["paired"], [("b", "gnnmoe-gcn"), ("a", "lora")]):
        other = accuracies(folder, method)
        assert row["minus"] == "knn+grid" and row["pairs"] == 6 == len(other)
        assert np.isclose(row["mean"], np.mean([other[k] - reference[k] for k in other]))
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["reference"] == "knn+grid"
    assert "| radius | knn+grid |" in (tmp_path / "cmp" / "compare.md").read_text()
    with pytest.raises(ValueError, match="holds methods"):
        compare.main([f"x={tmp_path / 'a'}", specs[1], "--output", str(tmp_path / "cmp")])
    with pytest.raises(ValueError, match="no runs of 'lokr'"):
        compare.main([f"x={tmp_path / 'a'}:lokr", specs[1], "--output", str(tmp_path / "cmp")])

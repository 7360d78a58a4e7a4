"""`--jobs`: the runs of a sweep spread over worker processes give the numbers of one process."""

import json

import pytest

from recipes.dg import parallel, train

TINY = [
    "--seeds",
    "0",
    "--test_envs",
    "0",
    "1",
    "--method",
    "lora",
    "probe",
    "--max_steps",
    "4",
    "--eval_every",
    "2",
]
TINY += ["--report_to", "none", "--routing_images", "0"]


def _results(out) -> dict:
    rows = {}
    for path in sorted((out / "runs").glob("*/*/result.json")):
        r = json.loads(path.read_text())
        rows[(r["method"], r["test_env"])] = (r["test_acc"], r["val_acc"], r["selected_step"])
    return rows


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("dg") / "one"
    table = train.main(TINY + ["--jobs", "1", "--output_dir", str(out)])
    return out, table


@pytest.mark.distributed
def test_two_jobs_give_the_numbers_of_one(one_process, tmp_path):
    out, table = one_process
    out2 = tmp_path / "two"
    table2 = train.main(TINY + ["--jobs", "2", "--output_dir", str(out2)])
    assert _results(out2) == _results(out)

    def accuracy(t):  # the table without its timings
        return {m: {k: v for k, v in row.items() if k != "train_seconds"} for m, row in t["methods"].items()}

    assert accuracy(table2) == accuracy(table)


@pytest.mark.distributed
def test_the_worker_ran_its_share_and_logged_it(tmp_path):
    out = tmp_path / "two"
    train.main(TINY + ["--jobs", "2", "--output_dir", str(out)])
    log = (out / "workers" / "shard1.log").read_text()
    assert "Traceback" not in log
    assert len(_results(out)) == 4


def test_auto_is_one_job_under_a_distributed_launch_or_on_a_gpu():
    assert parallel.resolve_jobs("auto", num_processes=2, device_type="cpu") == 1
    assert parallel.resolve_jobs("auto", num_processes=1, device_type="cuda") == 1


def test_auto_uses_the_cores_up_to_the_cap():
    expected = min(parallel.usable_cores(), parallel.MAX_AUTO_JOBS)
    assert parallel.resolve_jobs("auto", num_processes=1, device_type="cpu") == expected


@pytest.mark.parametrize(
    ("jobs", "processes", "device", "message"),
    [("0", 1, "cpu", ">= 1"), ("2", 2, "cpu", "--jobs 1"), ("2", 1, "cuda", "CPU runs")],
)
def test_bad_jobs_are_refused(jobs, processes, device, message):
    with pytest.raises(ValueError, match=message):
        parallel.resolve_jobs(jobs, processes, device)


@pytest.mark.parametrize("text", ["2/2", "a/3", "1", "-1/2"])
def test_bad_shards_are_refused(text):
    with pytest.raises(ValueError, match="k/N"):
        parallel.parse_shard(text)


def test_a_shard_needs_the_sweep_it_joins(tmp_path):
    with pytest.raises(FileNotFoundError, match="args.json"):
        train.main(TINY + ["--shard", "1/2", "--output_dir", str(tmp_path / "none")])


@pytest.mark.slow
def test_a_failing_worker_fails_the_sweep_and_names_its_log(tmp_path):
    # the worker's --shard 1/2 makes it join a sweep whose protocol (--max_steps) it does not match
    out = tmp_path / "dg"
    train.main(TINY + ["--jobs", "1", "--output_dir", str(out)])  # a finished sweep with --max_steps 4
    args = TINY + ["--output_dir", str(out), "--resume_from_checkpoint"]
    workers = parallel.start_workers(args + ["--max_steps", "6"], 2, out)
    with pytest.raises(RuntimeError, match="shard1.log"):
        parallel.wait_for_workers(workers)

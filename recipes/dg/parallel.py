"""Independent runs of a sweep in parallel worker processes (``--jobs N``).

Every run of the protocol is independent (its own seeds, split and model) and single-threaded runs give the same
numbers in any process, so on a CPU the runs can be spread over N processes: the main process starts N-1 workers,
the same command with ``--shard k/N``, each running every N-th run into the same output folder (one thread each),
runs its own share, waits, and writes the table from every run's ``result.json``. A worker's output goes to
``<output_dir>/workers/shard<k>.log``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MAX_AUTO_JOBS = 4  # "auto" never starts more processes than this (each holds a model and the data)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_jobs(requested: str, num_processes: int, device_type: str) -> int:
    """``--jobs``: an int, or ``auto`` = the usable cores (at most ``MAX_AUTO_JOBS``) on a CPU-only single-process
    launch, else 1. More than 1 under a distributed launch or on an accelerator is refused."""
    if requested == "auto":
        return min(usable_cores(), MAX_AUTO_JOBS) if num_processes == 1 and device_type == "cpu" else 1
    jobs = int(requested)
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1 or 'auto', got {jobs}.")
    if jobs > 1 and num_processes > 1:
        raise ValueError(f"--jobs {jobs} runs worker processes; under a {num_processes}-process launch use --jobs 1.")
    if jobs > 1 and device_type != "cpu":
        raise ValueError(f"--jobs {jobs} is for CPU runs; on {device_type} use --jobs 1 (one run fills the device).")
    return jobs


def parse_shard(text: str) -> tuple[int, int]:
    """``k/N`` -> ``(k, N)`` with ``0 <= k < N``."""
    k, sep, n = text.partition("/")
    if not sep or not k.isdigit() or not n.isdigit() or not 0 <= int(k) < int(n):
        raise ValueError(f"--shard expects k/N with 0 <= k < N, got {text!r}.")
    return int(k), int(n)


def start_workers(argv: list[str], jobs: int, output_dir: str | os.PathLike) -> list[tuple[subprocess.Popen, Path]]:
    """Starts shards 1..jobs-1 of the command ``argv`` (the recipe's arguments) as one-thread processes."""
    logs = Path(output_dir) / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    workers = []
    for k in range(1, jobs):
        log = logs / f"shard{k}.log"
        cmd = [sys.executable, "-m", "recipes.dg", *argv, "--jobs", "1", "--shard", f"{k}/{jobs}"]
        with open(log, "w") as f:
            workers.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), log))
    return workers


def wait_for_workers(workers: list[tuple[subprocess.Popen, Path]]) -> None:
    """Waits for every worker; raises with the end of its log if one failed (its finished runs stay on disk)."""
    failed = []
    for proc, log in workers:
        if proc.wait() != 0:
            failed.append((proc.returncode, log))
    if failed:
        code, log = failed[0]
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(
            f"{len(failed)} worker process(es) failed (first: exit {code}, log {log}):\n{tail}\n"
            "Finished runs are kept: fix the cause and rerun with --resume_from_checkpoint."
        )


def stop_workers(workers: list[tuple[subprocess.Popen, Path]]) -> None:
    """Terminates workers still running (the main process failed or was interrupted)."""
    for proc, _ in workers:
        if proc.poll() is None:
            proc.terminate()
    for proc, _ in workers:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

"""Shared fixtures: tiny synthetic shards, and helpers that run the trainer through torchrun."""
import contextlib
import io
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one torch thread a worker, here and in its subprocesses,
    # so that two workers never oversubscribe a 2-core machine
    os.environ["OMP_NUM_THREADS"] = "1"

import synthetic
from compare import parse_step_line  # (the readers of the trainer's log lines)
from repo_root import ROOT

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch
    torch.set_num_threads(1)

# a model and batch small enough that a step takes milliseconds on one CPU core
TINY_VOCAB = 128
TINY = ["--vocab_size", str(TINY_VOCAB), "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
        "--sequence_length", "32", "--device_batch_size", "4", "--batch_size", "8",
        "--val_tokens", "1024", "--dtype", "float32"]



@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Two training shards of 20k tokens and a validation shard of a sparse Markov language."""
    out = tmp_path_factory.mktemp("shards")
    synthetic.generate(str(out), vocab_size=TINY_VOCAB, train_shards=2, shard_tokens=20_000, val_tokens=4096)
    return out


def data_flags(shards: Path) -> list[str]:
    return ["--input_bin", str(shards / "synthetic_train_*.bin"), "--input_val_bin", str(shards / "synthetic_val_*.bin")]


def torchrun(nproc: int, args: list[str], timeout: float = 300, script: Path = ROOT / "train_gpt2.py",
             **popen) -> subprocess.CompletedProcess:
    """Run a script (train_gpt2.py by default) under a real torchrun (gloo on CPU) with nproc processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def run_trainer(args: list[str]) -> SimpleNamespace:
    """One process of train_gpt2.py, in this one (no torchrun: the trainer then runs alone, as one rank does):
    its exit status and what it printed. For anything distributed, or a signal, use torchrun()."""
    import train_gpt2
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            mp.delenv(name, raising=False)
        try:
            code = train_gpt2.main(args)
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def run_log(log_dir: Path) -> tuple[Path, list[str]]:
    """The single run log in log_dir and its lines."""
    logs = sorted(log_dir.glob("*.txt"))
    assert len(logs) == 1, logs
    return logs[0], logs[0].read_text().splitlines()


def val_losses(lines: list[str]) -> dict[int, float]:
    return {s.step: s.loss for s in map(parse_step_line, lines) if s and s.kind == "val"}


def train_losses(lines: list[str]) -> dict[int, float]:
    return {s.step: s.loss for s in map(parse_step_line, lines) if s and s.kind == "train"}


def checkpoints(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("*/state_step*.pt"))


LN_TINY_VOCAB = math.log(TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_checkpoint(shards, tmp_path_factory) -> Path:
    """A real checkpoint of a 2-step single-process run of the TINY model."""
    log_dir = tmp_path_factory.mktemp("tiny_run")
    result = run_trainer([*TINY, *data_flags(shards), "--num_iterations", "2", "--warmdown_iters", "1",
                          "--val_loss_every", "0", "--log_dir", str(log_dir)])
    assert result.returncode == 0, result.stderr[-2000:]
    return checkpoints(log_dir)[-1]

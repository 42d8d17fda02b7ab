"""Never lose a run: exact resume, atomic checkpoints, preemption by a real signal, the NaN guard, seeds."""
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from conftest import ROOT, TINY, checkpoints, data_flags, run_log, run_trainer, torchrun, train_losses
from train_gpt2 import get_lr, parse_args, save_checkpoint

RUN = [*TINY, "--warmdown_iters", "1", "--val_loss_every", "0"]


def test_resume_continues_exactly(shards, tmp_path):
    """2 processes, float32: 20 steps straight equal 10 steps, a resume, and 10 more."""
    common = [*RUN, *data_flags(shards), "--num_iterations", "20", "--seed", "3", "--num_experts", "4",
              "--top_k", "2", "--router_gate", "prob", "--aux_loss_coef", "0.01", "--router_bias_rate", "0.01",
              "--router_optimizer", "adam", "--data_seed", "5"]  # an MoE with moving router biases and a
    # shuffled data order: every piece of state matters
    straight = tmp_path / "straight"
    result = torchrun(2, [*common, "--save_every", "10", "--log_dir", str(straight)])
    assert result.returncode == 0, result.stderr[-3000:]
    middle, end = checkpoints(straight)
    assert middle.name == "state_step000010.pt" and end.name == "state_step000020.pt"
    # resume a copy of the step-10 checkpoint elsewhere, so the straight run's files stay untouched
    resumed = tmp_path / "resumed"
    (resumed / middle.parent.name).mkdir(parents=True)
    shutil.copy(middle, resumed / middle.parent.name / middle.name)
    result = torchrun(2, [*common, "--log_dir", str(resumed), "--resume", str(resumed / middle.parent.name / middle.name)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resume: from {resumed}" in result.stdout
    losses_straight = train_losses(run_log(straight)[1])
    losses_resumed = train_losses(run_log(resumed)[1])
    assert sorted(losses_resumed) == list(range(11, 21))
    loss_gap = max(abs(losses_straight[s] - losses_resumed[s]) for s in range(11, 21))
    final_straight = torch.load(end)
    final_resumed = torch.load(checkpoints(resumed)[-1])
    param_gap = max((final_straight["model"][k] - final_resumed["model"][k]).abs().max().item()
                    for k in final_straight["model"])
    print(f"resume: largest train-loss difference {loss_gap:.3e}, largest parameter difference {param_gap:.3e}")
    assert loss_gap == 0.0 and param_gap < 1e-6
    assert final_resumed["train_loader"] == final_straight["train_loader"]
    biases = torch.load(middle)["model"]["transformer.h.1.mlp.router.bias"]
    assert biases.abs().sum() > 0  # the checkpoint carried moved biases into the resumed run


def test_resume_latest_picks_the_newest_checkpoint_and_appends_to_the_runs_log(shards, tmp_path):
    common = [*RUN, *data_flags(shards), "--num_iterations", "6", "--log_dir", str(tmp_path)]
    assert run_trainer([*common, "--save_every", "2"]).returncode == 0
    first_end = torch.load(checkpoints(tmp_path)[-1])["model"]
    os.utime(checkpoints(tmp_path)[0])  # mtime decides 'latest': touch an older one
    result = run_trainer([*common, "--resume", "latest"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resume: from {checkpoints(tmp_path)[0]} at step 2" in result.stdout
    log, lines = run_log(tmp_path)  # still one log: the resumed run appends to it
    assert sum(l.startswith("resume: from") for l in lines) == 1
    # the resumed run wrote steps 4 and 6 again: the same parameters, so 'latest' restored everything
    resumed_end = torch.load(checkpoints(tmp_path)[-1])["model"]
    assert all(torch.equal(first_end[k], resumed_end[k]) for k in first_end)


def test_keep_checkpoints_keeps_the_newest(shards, tmp_path):
    result = run_trainer([*RUN, *data_flags(shards), "--num_iterations", "10", "--save_every", "2",
                          "--keep_checkpoints", "2", "--log_dir", str(tmp_path)])
    assert result.returncode == 0
    assert [p.name for p in checkpoints(tmp_path)] == ["state_step000008.pt", "state_step000010.pt"]


def test_a_crash_while_saving_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "state_step000010.pt"
    save_checkpoint({"step": 10, "weights": torch.ones(3)}, str(path), keep=0)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint({"step": 10, "weights": torch.zeros(3)}, str(path), keep=0)
    assert torch.equal(torch.load(path)["weights"], torch.ones(3))


def checkpoint_contents(path):
    state = torch.load(path)
    return state, {k for k in state}


def test_a_checkpoint_holds_everything_a_resume_needs(shards, tmp_path):
    result = torchrun(2, [*RUN, *data_flags(shards), "--num_iterations", "4", "--warmdown_iters", "2",
                          "--num_experts", "4", "--aux_loss_coef", "0.01", "--log_dir", str(tmp_path)])
    assert result.returncode == 0
    state, keys = checkpoint_contents(checkpoints(tmp_path)[-1])
    assert {"step", "run_id", "code", "args", "model", "optimizers", "train_loader",
            "train_time_ms", "timed_steps", "rng"} <= keys
    assert state["code"] == (ROOT / "train_gpt2.py").read_text() and state["args"]["num_experts"] == 4
    adam_embed, adam_head, muon = state["optimizers"]
    # Muon's momenta live on the rank that owns each matrix; the checkpoint gathers all of them
    n_matrices = sum(len(group["params"]) for group in muon["param_groups"])  # block matrices and routers
    assert len(muon["state"]) == n_matrices and all(s["momentum_buffer"].abs().sum() > 0 for s in muon["state"].values())
    # the schedule resumes from the step: each group keeps its base lr (the flags'), and its lr is the last step's
    args = parse_args([*RUN, "--num_iterations", "4", "--warmdown_iters", "2"])
    bases = [[g["initial_lr"] for g in opt["param_groups"]] for opt in state["optimizers"]]
    assert state["step"] == 4 and bases == [[args.embed_lr], [args.head_lr], [args.muon_lr, args.router_lr]]
    assert all(g["lr"] == g["initial_lr"] * get_lr(3, args) for opt in state["optimizers"] for g in opt["param_groups"])
    assert get_lr(3, args) == 0.5  # (warmdown 2: the last step's multiplier is (4 - 3) / 2)


def test_a_run_resumes_on_another_number_of_ranks(shards, tmp_path):
    """2 ranks to step 6, then 1 rank with the same micro-batches (two a step) to 12, against 2 ranks straight to
    12: Muon's momenta, spread over the ranks that own them, are gathered into the checkpoint and handed out anew."""
    common = [*RUN, *data_flags(shards), "--num_iterations", "12", "--seed", "4", "--data_seed", "4",
              "--num_experts", "4", "--top_k", "2", "--aux_loss_coef", "0.01"]
    straight = tmp_path / "straight"
    assert torchrun(2, [*common, "--save_every", "6", "--log_dir", str(straight)]).returncode == 0
    middle, end = checkpoints(straight)
    resumed = tmp_path / "resumed"
    (resumed / middle.parent.name).mkdir(parents=True)
    shutil.copy(middle, resumed / middle.parent.name / middle.name)
    result = run_trainer([*common, "--log_dir", str(resumed),
                          "--resume", str(resumed / middle.parent.name / middle.name)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "world_size:1" in result.stdout and torch.load(middle)["world_size"] == 2
    a, b = torch.load(end)["model"], torch.load(checkpoints(resumed)[-1])["model"]
    for name in a:  # float32 on CPU: the ranks' sums differ from one rank's by rounding only
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.equal(a["lm_head.weight"], torch.load(middle)["model"]["lm_head.weight"])  # it trained on


def run_until(cmd, log_dir, until_line, env):
    """Start a job, wait until its log shows a line, and return the process."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        logs = list(log_dir.glob("*.txt"))
        if logs and until_line in logs[0].read_text():
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{until_line!r} never appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_job_checkpoints_and_exits_zero_then_resumes(shards, tmp_path, sig):
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [*RUN, *data_flags(shards), "--num_iterations", "100000", "--warmdown_iters", "10",
            "--log_dir", str(tmp_path)]
    proc = run_until([str(ROOT / "run_dense.sh"), *args], tmp_path, "step:5/100000 train_loss", env)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    (ckpt,) = checkpoints(tmp_path)
    step = torch.load(ckpt)["step"]
    assert f"stopped by {sig.name}: checkpoint {ckpt}" in out
    assert f"resume: rerun the same command with --resume {ckpt}" in out
    _, lines = run_log(tmp_path)
    assert max(train_losses(lines)) == step  # stopped at the step boundary after the signal
    # the printed resume command works: continue for a few steps with a shorter schedule
    result = subprocess.run([str(ROOT / "run_dense.sh"), *args[:-6], "--num_iterations", str(step + 3),
                             "--warmdown_iters", "1", "--log_dir", str(tmp_path), "--resume", str(ckpt)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert max(train_losses(run_log(tmp_path)[1])) == step + 3


@pytest.mark.parametrize("flag, stopped", [
    (["--head_lr", "1e37"], "stopped: the train loss is inf (not saved); resume with"),
    # the embedding overflows while the loss stays finite (rms_norm scales it away): caught at the checkpoint
    (["--embed_lr", "3e37"], "stopped: the parameters are not finite (not saved); resume with"),
])
def test_divergence_stops_every_rank_and_keeps_the_last_checkpoint(shards, tmp_path, flag, stopped):
    result = torchrun(2, [*RUN, *data_flags(shards), "--num_iterations", "30", "--save_every", "1", "--seed", "1",
                          "--log_dir", str(tmp_path), *flag])
    # the workers stop with exit code 3 and no traceback (torchrun then reports the failure in its own words)
    assert result.returncode != 0 and "[rank0]: Traceback" not in result.stderr and "exitcode  : 3" in result.stderr
    (line,) = [l for l in result.stdout.splitlines() if "stopped:" in l]
    assert stopped in line
    saved = checkpoints(tmp_path)
    assert f"resume with --resume {saved[-1]} and lower learning rates" in line
    last = torch.load(saved[-1])
    assert all(torch.isfinite(t).all() for t in last["model"].values())  # nothing poisoned was written
    assert int(line.split("/")[0].split(":")[1]) >= last["step"]


def test_the_same_seeds_give_the_same_losses_and_a_data_seed_changes_the_data(shards, tmp_path):
    runs = {}
    for name, seed, data_seed in [("a", "11", "0"), ("b", "11", "0"), ("c", "12", "0"), ("d", "11", "5"),
                                  ("e", "11", "5")]:
        result = run_trainer([*RUN, *data_flags(shards), "--num_iterations", "5", "--seed", seed,
                              "--data_seed", data_seed, "--log_dir", str(tmp_path / name)])
        assert result.returncode == 0
        _, lines = run_log(tmp_path / name)
        assert f"seed:{seed} " in "\n".join(lines) and f"'data_seed': {data_seed}" in "\n".join(lines)
        runs[name] = train_losses(lines)
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    # the step-1 loss is ln(V) whatever the data (the head starts at zero); from step 2 the data shows
    assert runs["d"] == runs["e"] and all(runs["d"][s] != runs["a"][s] for s in range(2, 6))


def test_a_drawn_seed_is_logged_and_reproduces(shards, tmp_path):
    result = run_trainer([*RUN, *data_flags(shards), "--num_iterations", "3", "--log_dir", str(tmp_path / "a")])
    assert result.returncode == 0, result.stderr[-2000:]
    _, lines = run_log(tmp_path / "a")
    seed = next(l for l in lines if l.startswith("seed:")).split()[0].split(":")[1]
    again = run_trainer([*RUN, *data_flags(shards), "--num_iterations", "3", "--seed", seed,
                         "--log_dir", str(tmp_path / "b")])
    assert result.returncode == again.returncode == 0
    assert train_losses(lines) == train_losses(run_log(tmp_path / "b")[1])

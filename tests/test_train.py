"""End-to-end runs of train_gpt2.py under a real torchrun with 1 and 2 gloo processes on CPU."""
import os
import re

import pytest
import torch

from conftest import (LN_TINY_VOCAB, ROOT, TINY, checkpoints, data_flags, run_log, torchrun, train_losses,
                      val_losses)
from compare import parse_step_line
from train_gpt2 import get_lr, parse_args


def test_two_process_run_learns_and_logs_like_the_record(shards, tmp_path):
    args = [*TINY, *data_flags(shards), "--num_iterations", "60", "--warmdown_iters", "20",
            "--val_loss_every", "20", "--log_dir", str(tmp_path)]
    result = torchrun(2, args)
    assert result.returncode == 0, result.stderr[-3000:]
    log, lines = run_log(tmp_path)
    # the log is the record: it begins with this script's source, fenced, then the environment
    source = (ROOT / "train_gpt2.py").read_text()
    assert log.read_text().startswith("=" * 100 + "\n" + source + "=" * 100 + "\nRunning pytorch ")
    # and the machine: CPU step times are only comparable on the same CPU
    assert re.search(rf"^python 3\.\d+\.\d+, cpu: .+, {os.cpu_count()} cores$", log.read_text(), flags=re.M)
    val = val_losses(lines)
    assert sorted(val) == [0, 20, 40, 60]
    assert abs(val[0] - LN_TINY_VOCAB) < 1e-3  # zero-initialised head
    assert val[60] < val[0] - 1.5, val  # the Markov language is learnable
    train = train_losses(lines)
    assert sorted(train) == list(range(1, 61))
    # every step line keeps the record's exact format, a train line adding the lr multiplier at its end; the
    # console shows the same lines
    step_lines = [l for l in lines if l.startswith("step:")]
    record = r"step:\d+/60 (val|train)_loss:\d+\.\d{4} train_time:\d+ms step_avg:(nan|\d+\.\d\d)ms"
    assert all(re.fullmatch(record, l) or re.fullmatch(record + r" lr_mult:\d\.\d{4}", l) for l in step_lines)
    args = parse_args([*TINY, "--num_iterations", "60", "--warmdown_iters", "20"])
    logged = {s.step: float(s.extra["lr_mult"]) for s in map(parse_step_line, step_lines) if s.kind == "train"}
    assert logged == {step: round(get_lr(step - 1, args), 4) for step in range(1, 61)}
    assert logged[40] == 1.0 and logged[50] == 0.55 and logged[60] == 0.05  # the warmdown's last 20 steps
    assert [l for l in result.stdout.splitlines() if l.startswith("step:")] == step_lines
    assert "world_size:2" in result.stdout


MOE_WITH_EVERYTHING = ["--num_experts", "4", "--top_k", "2", "--router_gate", "st", "--aux_loss_coef", "0.01",
                       "--router_z_loss_coef", "0.001", "--router_bias_rate", "0.01"]


@pytest.mark.parametrize("model_flags", [[], [*MOE_WITH_EVERYTHING, "--data_seed", "3"]],
                         ids=["dense, record order", "moe, sampled order"])
def test_two_ranks_of_one_micro_batch_equal_one_rank_of_two(shards, tmp_path, model_flags):
    """Data parallelism and gradient accumulation are the same computation (float32 on CPU): the same
    sequences in each global batch, in the record's order and in a sampled one. For the MoE this holds only if
    the router biases move by the loads summed over ranks, as over micro-batches."""
    common = [*TINY, *data_flags(shards), "--num_iterations", "4", "--warmdown_iters", "2",
              "--val_loss_every", "0", "--seed", "7", *model_flags]
    finals = []
    for nproc, device_batch in [(2, 4), (1, 4)]:
        log_dir = tmp_path / f"nproc{nproc}"
        flags = [*common, "--device_batch_size", str(device_batch), "--log_dir", str(log_dir)]
        result = torchrun(nproc, flags)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"world_size:{nproc}" in result.stdout
        (ckpt,) = checkpoints(log_dir)
        finals.append((torch.load(ckpt)["model"], train_losses(run_log(log_dir)[1])))
    (two_ranks, losses2), (one_rank, losses1) = finals
    if model_flags:
        assert one_rank["transformer.h.0.mlp.router.bias"].abs().sum() > 0  # the biases did move
    for name in one_rank:
        torch.testing.assert_close(two_ranks[name], one_rank[name], atol=1e-6, rtol=1e-5, msg=name)
    assert max(abs(losses2[s] - losses1[s]) for s in losses1) < 1e-4
    assert losses1[4] < losses1[1]  # and it trained


def test_each_batch_is_trained_on_once_and_the_loader_wraps_with_a_warning(shards, tmp_path):
    """The record fetched a batch before resetting the loader and trained on it twice."""
    steps, accumulation, chunk = 170, 2, 4 * 32  # chunk: device_batch_size x sequence_length x 1 rank
    result = torchrun(1, [*TINY, *data_flags(shards), "--num_iterations", str(steps), "--warmdown_iters", "1",
                          "--val_loss_every", "0", "--log_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    per_shard = (20_000 - 1) // chunk  # 156 micro-batches in each of the two shards
    consumed = steps * accumulation - 2 * per_shard  # into the first shard again, after one full pass
    (ckpt,) = checkpoints(tmp_path)
    assert torch.load(ckpt)["train_loader"] == dict(shard=0, position=consumed * chunk)
    assert "warning: the training shards hold 156 steps, fewer than --num_iterations; the loader wraps around" in result.stdout


def test_a_sampled_order_past_one_pass_says_it_starts_a_new_order(shards, tmp_path):
    result = torchrun(1, [*TINY, *data_flags(shards), "--num_iterations", "160", "--warmdown_iters", "1",
                          "--val_loss_every", "0", "--data_seed", "4", "--log_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    # 2 shards of (20,000 - 1) // 32 = 624 sequences: 156 steps of 8
    assert ("warning: the training shards hold 156 steps, fewer than --num_iterations; the loader starts a new order "
            "(download more shards to avoid it)") in result.stdout
    (ckpt,) = checkpoints(tmp_path)
    assert torch.load(ckpt)["train_loader"] == dict(sequence=160 * 8, sequences=2 * 624)

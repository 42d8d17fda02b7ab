"""End-to-end runs of train_gpt2.py under a real torchrun with 1 and 2 gloo processes on CPU."""
import os
import re

import pytest
import torch

from conftest import (LN_TINY_VOCAB, ROOT, TINY, checkpoints, data_flags, run_log, run_trainer, torchrun, train_losses,
                      val_losses)
from compare import parse_step_line
from train_gpt2 import (GPT, DistributedDataLoader, Runtime, TrainClock, TrainState, build_run, evaluate, get_lr,
                        make_optimizers, parse_args, train_step)

CPU = Runtime(rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32, compile_model=False)


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
        result = torchrun(nproc, flags) if nproc > 1 else run_trainer(flags)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"world_size:{nproc}" in result.stdout
        (ckpt,) = checkpoints(log_dir)
        lines = run_log(log_dir)[1]
        finals.append((torch.load(ckpt)["model"], train_losses(lines), val_losses(lines)[4]))
    (two_ranks, losses2, val2), (one_rank, losses1, val1) = finals
    assert abs(val2 - val1) < 1e-4  # and they validate alike: the val set is split over the ranks and summed
    if model_flags:
        assert one_rank["transformer.h.0.mlp.router.bias"].abs().sum() > 0  # the biases did move
    for name in one_rank:
        torch.testing.assert_close(two_ranks[name], one_rank[name], atol=1e-6, rtol=1e-5, msg=name)
    assert max(abs(losses2[s] - losses1[s]) for s in losses1) < 1e-4
    assert losses1[4] < losses1[1]  # and it trained


def test_each_micro_batch_is_the_loaders_next_and_is_trained_on_once(shards):
    """The record fetched a batch, reset the loader and then fetched one ahead each micro-step, so it trained on
    its first batch twice while its loader ended where it should. Here each forward pass gets the loader's next
    batch: the model sees exactly a fresh loader's batches, in order."""
    args = parse_args([*TINY, *data_flags(shards)])  # batch 8 of device batches 4: two micro-steps a step
    torch.manual_seed(0)
    model = GPT(args)
    loader = DistributedDataLoader(args.input_bin, args.device_batch_size, args.sequence_length, 0, 1)
    state = TrainState(model, make_optimizers(model, args, torch.float32), loader, TrainClock())
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    for _ in range(3):
        train_step(model, state, 1.0, args, CPU)
    fresh = DistributedDataLoader(args.input_bin, args.device_batch_size, args.sequence_length, 0, 1)
    assert len(seen) == 3 * 2 and all(torch.equal(x, fresh.next_batch()[0]) for x in seen)


def test_validation_reads_the_same_tokens_whatever_the_data_seed(shards):
    """Every pair of an A/B validates on one val set: the data seed orders the training data only."""
    val_losses_by_seed = []
    for data_seed in (0, 3, 4):
        args = parse_args([*TINY, *data_flags(shards), "--data_seed", str(data_seed)])
        torch.manual_seed(0)
        state, model, val_loader, _ = build_run(args, CPU, lambda line, console=True: None, None)
        assert val_loader.data_seed == 0 and state.train_loader.data_seed == data_seed
        torch.manual_seed(1)
        torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # a model whose loss depends on the tokens
        val_losses_by_seed.append(evaluate(model, val_loader, args, CPU)[0])
    assert val_losses_by_seed[0] == val_losses_by_seed[1] == val_losses_by_seed[2]


def test_each_batch_is_trained_on_once_and_the_loader_wraps_with_a_warning(shards, tmp_path):
    """Where the loader ends after a pass and a part of another (the record's loader ran out early)."""
    steps, accumulation, chunk = 170, 2, 4 * 32  # chunk: device_batch_size x sequence_length x 1 rank
    result = run_trainer([*TINY, *data_flags(shards), "--num_iterations", str(steps), "--warmdown_iters", "1",
                          "--val_loss_every", "0", "--log_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    per_shard = (20_000 - 1) // chunk  # 156 micro-batches in each of the two shards
    consumed = steps * accumulation - 2 * per_shard  # into the first shard again, after one full pass
    (ckpt,) = checkpoints(tmp_path)
    assert torch.load(ckpt)["train_loader"] == dict(shard=0, position=consumed * chunk)
    assert "warning: the training shards hold 156 steps, fewer than --num_iterations; the loader wraps around" in result.stdout


def test_a_sampled_order_past_one_pass_says_it_starts_a_new_order(shards, tmp_path):
    result = run_trainer([*TINY, *data_flags(shards), "--num_iterations", "160", "--warmdown_iters", "1",
                          "--val_loss_every", "0", "--data_seed", "4", "--log_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    # 2 shards of (20,000 - 1) // 32 = 624 sequences: 156 steps of 8
    assert ("warning: the training shards hold 156 steps, fewer than --num_iterations; the loader starts a new order "
            "(download more shards to avoid it)") in result.stdout
    (ckpt,) = checkpoints(tmp_path)
    assert torch.load(ckpt)["train_loader"] == dict(sequence=160 * 8, sequences=2 * 624)


def test_wandb_gets_the_logs_metrics(shards, tmp_path, monkeypatch):
    """A stand-in wandb module: --wandb sends every train and val loss and lr multiplier, at the log's steps."""
    import importlib.machinery
    import types
    import train_gpt2
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun()
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    flags = [*TINY, *data_flags(shards), "--num_iterations", "4", "--warmdown_iters", "2", "--val_loss_every", "2",
             "--wandb", "--wandb_project", "p", "--seed", "1", "--log_dir", str(tmp_path)]
    assert train_gpt2.main(flags) == 0
    _, lines = run_log(tmp_path)
    assert calls[0][0] == "init" and calls[0][1]["project"] == "p" and calls[0][1]["config"]["num_iterations"] == 4
    assert calls[-1] == ("finish",)
    logged = [(step, values) for kind, step, values in (c for c in calls if c[0] == "log")]
    vals = {step: v["val_loss"] for step, v in logged if "val_loss" in v}
    trains = {step: (v["train_loss"], v["lr_mult"]) for step, v in logged if "train_loss" in v}
    assert {s: round(v, 4) for s, v in vals.items()} == val_losses(lines) and sorted(vals) == [0, 2, 4]
    assert {s: round(v[0], 4) for s, v in trains.items()} == train_losses(lines)
    assert [trains[s][1] for s in (1, 2, 3, 4)] == [1.0, 1.0, 1.0, 0.5]

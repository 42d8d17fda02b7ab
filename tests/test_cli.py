import contextlib
import importlib.util
import io
import subprocess
import sys
from dataclasses import fields
from types import SimpleNamespace

import pytest

import train_gpt2
from conftest import ROOT, TINY, data_flags
from train_gpt2 import Hyperparameters, build_parser, get_lr, parse_args


def test_defaults_reproduce_the_2024_11_03_record():
    a = Hyperparameters()
    assert (a.batch_size, a.device_batch_size, a.sequence_length) == (512, 64, 1024)
    assert (a.num_iterations, a.warmup_iters, a.warmdown_iters) == (4578, 0, 1308)
    assert (a.val_loss_every, a.val_tokens) == (125, 10485760)
    assert (a.embed_lr, a.head_lr, a.muon_lr, a.muon_momentum) == (0.3, 0.002, 0.02, 0.95)
    assert (a.vocab_size, a.n_layer, a.n_head, a.n_embd) == (50304, 12, 6, 768)
    assert a.input_bin == "data/fineweb10B/fineweb_train_*.bin"
    assert parse_args([]) == a


def test_every_field_is_a_flag_with_help():
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in fields(Hyperparameters)}
    assert all(a.help for a in flags.values())


def test_flags_parse_to_the_field_types():
    a = parse_args(["--num_iterations", "100", "--muon_lr", "0.01", "--dtype", "bfloat16", "--no-compile"])
    assert a.num_iterations == 100 and isinstance(a.num_iterations, int)
    assert a.muon_lr == 0.01 and a.dtype == "bfloat16" and a.compile is False
    assert parse_args(["--compile"]).compile is True and parse_args([]).compile is None
    assert parse_args(["--expert_hidden", "768"]).expert_hidden == 768 and parse_args([]).expert_hidden is None


def test_lr_schedule_is_constant_then_linear_warmdown():
    a = Hyperparameters(num_iterations=100, warmdown_iters=20)
    assert [get_lr(i, a) for i in (0, 79, 80)] == [1.0, 1.0, 1.0]
    assert get_lr(90, a) == pytest.approx(0.5) and get_lr(100, a) == 0.0
    w = Hyperparameters(num_iterations=100, warmup_iters=10, warmdown_iters=20)
    assert get_lr(0, w) == pytest.approx(0.1) and get_lr(9, w) == 1.0
    # no warmdown: constant to the end, including the scheduler's step past the last one
    flat = Hyperparameters(num_iterations=10, warmdown_iters=0)
    assert [get_lr(i, flat) for i in range(11)] == [1.0] * 11


def check(args, world_size=1):
    """train_gpt2.py --check_only, in this process (WORLD_SIZE as torchrun sets it): its exit status and output.
    test_a_real_process_checks_without_a_traceback runs the same in a process of its own."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("WORLD_SIZE", str(world_size))
        mp.delenv("RANK", raising=False)
        try:
            code = train_gpt2.main(["--check_only", *args])
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_a_real_process_checks_without_a_traceback(shards):
    def real(args):
        return subprocess.run([sys.executable, str(ROOT / "train_gpt2.py"), "--check_only", *args], cwd=ROOT,
                              capture_output=True, text=True, env={"WORLD_SIZE": "4", "PATH": ""}, timeout=60)
    bad = real([*TINY, *data_flags(shards), "--batch_size", "8"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: --batch_size 8 is not a multiple of --device_batch_size 4 x 4 ranks = 16; change either"]
    good = real([*TINY, *data_flags(shards), "--batch_size", "16"])
    assert good.returncode == 0 and good.stdout.strip() == (
        "ok: the flags, the data and the checkpoint check out for 4 rank(s)"), good.stderr


BAD_INPUTS = [
    (["--batch_size", "10"], 1, "--batch_size 10 is not a multiple of --device_batch_size 4 x 1 ranks = 4"),
    (["--batch_size", "8"], 4, "--batch_size 8 is not a multiple of --device_batch_size 4 x 4 ranks = 16"),
    (["--val_tokens", "1000"], 1, "--val_tokens 1000 is not a multiple of"),
    (["--num_iterations", "0"], 1, "--num_iterations must be positive, got 0"),
    (["--device_batch_size", "-4"], 1, "--device_batch_size must be positive, got -4"),
    (["--n_head", "3"], 1, "--n_embd 32 must split into --n_head 3 heads of even size"),
    (["--warmdown_iters", "5000"], 1, "exceed --num_iterations"),
    (["--dtype", "fp16"], 1, "argument --dtype: invalid choice: 'fp16'"),
    (["--num_iterations", "ten"], 1, "argument --num_iterations: invalid int value: 'ten'"),
    (["--no_such_flag", "1"], 1, "unrecognized arguments: --no_such_flag"),
    (["--num_experts", "0"], 1, "--num_experts must be positive, got 0"),
    (["--num_experts", "4", "--top_k", "5"], 1, "--top_k 5 must lie in [1, --num_experts 4]"),
    (["--num_experts", "4", "--router", "hash", "--top_k", "2"], 1,
     "--router hash takes --top_k 1 at most, not 2"),
    (["--num_experts", "4", "--router", "hash", "--aux_loss_coef", "0.01"], 1,
     "--router hash does not use --aux_loss_coef; leave it at 0.0, or use a router that does: learned"),
    (["--num_experts", "4", "--router", "random"], 1, "argument --router: invalid choice: 'random'"),
    (["--num_experts", "4", "--router_gate", "prob", "--null_expert_bias", "10"], 1,
     "--null_expert_bias 10.0 needs --router_gate renorm"),
    (["--aux_loss_coef", "-1"], 1, "--aux_loss_coef must be >= 0, got -1.0"),
    (["--num_experts", "4", "--router", "hash", "--router_z_loss_coef", "0.001"], 1,
     "--router hash does not use --router_z_loss_coef; leave it at 0.0, or use a router that does"),
    (["--router_bias_rate", "-0.01"], 1, "--router_bias_rate must be >= 0, got -0.01"),
    (["--num_experts", "4", "--router_gate", "st", "--null_expert_bias", "1"], 1, "needs --router_gate renorm"),
    (["--null_expert_bias", "-1"], 1, "--null_expert_bias must be >= 0, got -1.0"),
    (["--balance_scope", "world"], 1, "argument --balance_scope: invalid choice: 'world'"),
    (["--router_optimizer", "sgd"], 1, "argument --router_optimizer: invalid choice: 'sgd'"),
    (["--num_experts", "16", "--top_k", "4", "--expert_hidden", "0"], 1,
     "--expert_hidden must be positive, got 0"),
    (["--num_experts", "16", "--top_k", "4", "--expert_hidden", "-32"], 1, "--expert_hidden must be positive, got -32"),
    (["--num_experts", "16", "--top_k", "3", "--shared_expert_hidden", "-1"], 1,
     "--shared_expert_hidden must be >= 0, got -1"),
    (["--shared_expert_hidden", "32"], 1, "--shared_expert_hidden needs --num_experts 2 or more"),
    (["--num_experts", "16", "--top_k", "17", "--expert_hidden", "8"], 1, "--top_k 17 must lie in [1, --num_experts 16]"),
    (["--expert_hidden", "wide"], 1, "argument --expert_hidden: invalid int value: 'wide'"),
    (["--mlp_output_scale", "0"], 1, "--mlp_output_scale must be positive and finite, got 0.0"),
    (["--mlp_output_scale", "nan"], 1, "--mlp_output_scale must be positive and finite, got nan"),
]


@pytest.mark.parametrize("bad, world_size, message", BAD_INPUTS)
def test_bad_flags_get_one_clear_line(shards, bad, world_size, message):
    result = check([*TINY, *data_flags(shards), "--num_iterations", "10", "--warmdown_iters", "2", *bad], world_size)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([l for l in result.stderr.splitlines() if l.startswith("error") or ": error:" in l]) == 1


def test_missing_data_names_the_glob_and_the_download_command(tmp_path):
    result = check([*TINY, "--input_bin", str(tmp_path / "fineweb_train_*.bin")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}/fineweb_train_*.bin: no shard matches; download the data with "
        "`python data/cached_fineweb10B.py`"]


def test_good_flags_pass_the_check(shards):
    result = check([*TINY, *data_flags(shards), "--num_iterations", "10", "--warmdown_iters", "2"])
    assert result.returncode == 0, result.stderr
    assert "ok:" in result.stdout


def test_wandb_without_the_package_says_how_to_get_it(shards):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here, so this error cannot occur")
    result = check([*TINY, *data_flags(shards), "--wandb"])
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --wandb needs the wandb package: pip install wandb (or drop --wandb)"


def test_bad_checkpoints_get_one_clear_line(shards, tiny_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    foreign = tmp_path / "foreign.pt"
    import torch
    torch.save({"weights": torch.ones(2)}, foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    cases = [
        (["--resume", str(tmp_path / "nope.pt")], f"error: --resume {tmp_path}/nope.pt: no such file"),
        (["--resume", str(truncated)], f"error: --resume {truncated}: truncated, or not a checkpoint"),
        (["--resume", str(garbage)], f"error: --resume {garbage}: truncated, or not a checkpoint"),
        (["--resume", str(foreign)], f"error: --resume {foreign}: not a checkpoint of this trainer (missing ["),
        (["--resume", str(tiny_checkpoint), "--n_layer", "3", "--num_experts", "4"],
         f"error: --resume {tiny_checkpoint}: the model, its optimizers or the data order differ in n_layer (checkpoint 2, now 3), "
         f"num_experts (checkpoint 1, now 4); resume with the checkpoint's values"),
        (["--resume", str(tiny_checkpoint), "--data_seed", "2"],  # another data order is another run
         f"error: --resume {tiny_checkpoint}: the model, its optimizers or the data order differ in data_seed "
         f"(checkpoint 0, now 2); resume with the checkpoint's values"),
        (["--resume", "latest", "--log_dir", str(tmp_path / "empty")],
         f"error: --resume latest: no state_step*.pt under {tmp_path}/empty/*/"),
        (["--keep_checkpoints", "-1"], "error: --keep_checkpoints must be >= 0, got -1"),
    ]
    for bad, message in cases:
        result = check([*TINY, *data_flags(shards), "--num_iterations", "10", "--warmdown_iters", "2", *bad])
        assert result.returncode == 2, bad
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (bad, result.stderr)
    ok = check([*TINY, *data_flags(shards), "--num_iterations", "10", "--warmdown_iters", "2",
                "--resume", str(tiny_checkpoint)])
    assert ok.returncode == 0, ok.stderr

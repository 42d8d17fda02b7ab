"""Routing that learns: the straight-through gate, z-loss, auxiliary-loss-free biases, global balance,
the router's optimizer, and the README's flag table."""
import math
import signal
from dataclasses import fields

import pytest
import torch

import torch.nn.functional as F

import train_gpt2
from compare import parse_router_line
from conftest import TINY, checkpoints, data_flags, run_log, run_trainer, torchrun, train_losses, val_losses
from test_moe import config, randomise
from train_gpt2 import GPT, Hyperparameters, LearnedRouter, Muon, Router, make_optimizers


def router_ce_grads(gate):
    torch.manual_seed(0)
    model = GPT(config(router_gate=gate))
    for block in model.transformer.h:
        randomise(block.mlp)
    torch.nn.init.normal_(model.lm_head.weight, std=0.05)
    idx = torch.randint(0, 64, (2, 16))
    loss, _ = model(idx, torch.randint(0, 64, (2, 16)))
    return loss, torch.autograd.grad(loss, [b.mlp.router.weight for b in model.transformer.h])


def test_straight_through_gate_is_renorms_value_with_probs_gradient():
    torch.manual_seed(0)
    x, idx = torch.randn(32, 32), torch.zeros(32, dtype=torch.long)
    for top_k in (1, 2):
        renorm, st = LearnedRouter(config(top_k=top_k)), LearnedRouter(config(top_k=top_k, router_gate="st"))
        st.weight.data.copy_(renorm.weight)
        assert torch.equal(st(x, idx)[1], renorm(x, idx)[1])  # the forward values, bit for bit
        assert torch.equal(st(x, idx)[0], renorm(x, idx)[0])
    loss_renorm, grads_renorm = router_ce_grads("renorm")
    loss_st, grads_st = router_ce_grads("st")
    assert loss_st.item() == loss_renorm.item()
    assert all(torch.count_nonzero(g) == 0 for g in grads_renorm)  # exactly zero
    assert all(g.norm() > 1e-4 for g in grads_st)  # the cross-entropy now reaches the router


def test_z_loss_on_a_hand_computed_input():
    router = LearnedRouter(config(n_embd=2))
    router.weight.data = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    _, _, stats = router(x, torch.zeros(2, dtype=torch.long))
    # logits [1, 0, 0, 0] and [0, 0, 0, 2]
    expected = (math.log(math.e + 3) ** 2 + math.log(3 + math.e ** 2) ** 2) / 2
    assert stats["z"].item() == pytest.approx(expected, rel=1e-6)


def test_bias_update_pulls_a_skewed_router_toward_uniform_load():
    torch.manual_seed(0)
    router = LearnedRouter(config(n_embd=16))
    router.weight.data = torch.randn(4, 16) * 0.1
    router.weight.data[0] += 0.05  # nearly every token prefers expert 0
    x = torch.randn(4096, 16).abs()
    idx = torch.zeros(4096, dtype=torch.long)

    def load():
        experts = router(x, idx)[0].flatten()
        return torch.stack([(experts == e).sum() for e in range(4)]).float()

    skewed = load()
    assert skewed.max() / skewed.sum() > 0.9
    for _ in range(20):
        router.update_bias(load(), rate=0.01)
    balanced = load()
    assert balanced.max() / balanced.sum() < 0.32, balanced  # from 0.93 to near 0.25 in 20 steps
    assert router.bias.sum().abs() < 1e-6  # centred
    assert router.bias[0] < router.bias[1:].min()  # the crowded expert was pushed down
    # the gate still uses the unbiased probability
    probs = (x @ router.weight.T).softmax(-1)
    experts, gates, _ = LearnedRouter.forward(router, x, idx)
    assert torch.equal(gates, torch.ones_like(gates))  # renorm top-1
    prob_router = LearnedRouter(config(n_embd=16, router_gate="prob"))
    prob_router.load_state_dict(router.state_dict())
    experts, gates, _ = prob_router(x, idx)
    torch.testing.assert_close(gates, probs.gather(-1, experts))


def test_router_optimizer_muon_or_adam_with_its_own_lr():
    model = GPT(config())
    routers = {id(b.mlp.router.weight) for b in model.transformer.h}
    muon_opts = make_optimizers(model, Hyperparameters(num_experts=4, router_lr=0.005), torch.float32)
    assert len(muon_opts) == 3 and isinstance(muon_opts[2], Muon)
    matrices, router_group = muon_opts[2].param_groups
    assert {id(p) for p in router_group["params"]} == routers and router_group["lr"] == 0.005
    assert not routers & {id(p) for p in matrices["params"]} and matrices["lr"] == 0.02
    adam_opts = make_optimizers(model, Hyperparameters(num_experts=4, router_optimizer="adam", router_lr=0.001),
                                torch.float32)
    assert len(adam_opts) == 4 and isinstance(adam_opts[3], torch.optim.Adam)
    assert {id(p) for p in adam_opts[3].param_groups[0]["params"]} == routers
    assert adam_opts[3].param_groups[0]["lr"] == 0.001
    assert len(adam_opts[2].param_groups) == 1


ROUTING = ["--num_experts", "4", "--val_loss_every", "0", "--warmdown_iters", "1"]


def test_global_balance_scope_equals_micro_at_one_rank_and_one_micro_batch(shards, tmp_path):
    results = {}
    for scope in ("micro", "global"):
        args = [*TINY, *data_flags(shards), *ROUTING, "--batch_size", "4", "--aux_loss_coef", "0.1",
                "--num_iterations", "6", "--seed", "5", "--balance_scope", scope, "--log_dir", str(tmp_path / scope)]
        assert run_trainer(args).returncode == 0
        results[scope] = (train_losses(run_log(tmp_path / scope)[1]), torch.load(checkpoints(tmp_path / scope)[-1]))
    assert results["micro"][0] == results["global"][0]
    for name, value in results["micro"][1]["model"].items():
        assert torch.equal(value, results["global"][1]["model"][name]), name


def test_global_balance_over_two_ranks_is_the_balance_loss_of_their_whole_batch(shards, tmp_path):
    """2 ranks of 4 sequences with the global scope compute, through the all-reduce of their loads and DDP's mean
    of their gradients, the balance loss of all 8 sequences at once: what one rank of 8 computes with the micro
    scope. Without the all-reduce each rank would balance its own 4, and the runs would part."""
    runs = {}
    for nproc, device_batch, scope in [(2, 4, "global"), (1, 8, "micro"), (2, 4, "micro")]:
        log_dir = tmp_path / f"{nproc}x{device_batch}_{scope}"
        args = [*TINY, *data_flags(shards), *ROUTING, "--aux_loss_coef", "0.5", "--num_iterations", "6",
                "--seed", "5", "--device_batch_size", str(device_batch), "--balance_scope", scope,
                "--log_dir", str(log_dir)]
        assert (torchrun(nproc, args) if nproc > 1 else run_trainer(args)).returncode == 0
        runs[nproc, scope] = torch.load(checkpoints(log_dir)[-1])["model"]
    for name, value in runs[1, "micro"].items():
        torch.testing.assert_close(runs[2, "global"][name], value, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.allclose(runs[2, "micro"]["transformer.h.0.mlp.router.weight"],
                              runs[1, "micro"]["transformer.h.0.mlp.router.weight"], atol=1e-4)


def test_global_balance_scope_differs_from_micro_when_it_should(shards, tmp_path):
    """With 2 micro-batches the global scope balances over more tokens, so the runs part ways."""
    losses = {}
    for scope in ("micro", "global"):
        args = [*TINY, *data_flags(shards), *ROUTING, "--aux_loss_coef", "0.5", "--num_iterations", "6",
                "--seed", "5", "--balance_scope", scope, "--log_dir", str(tmp_path / scope)]
        assert run_trainer(args).returncode == 0
        losses[scope] = train_losses(run_log(tmp_path / scope)[1])
    assert losses["micro"][1] == losses["global"][1] and losses["micro"] != losses["global"]


def test_every_field_is_a_flag_whose_help_says_what_the_field_does():
    """--help is the flags' reference (the README points to it): every field, its help and the routers' summaries."""
    text = " ".join(train_gpt2.build_parser().format_help().split())
    for f in fields(Hyperparameters):
        assert f"--{f.name} " in text and " ".join(f.metadata["help"].split()) in text, f.name
    assert "learned: a linear router (softmax, top-k); hash: token id mod E" in text


@pytest.fixture
def sigmoid_router():
    """The whole of adding a router: one subclass, which names its --router choice."""
    class SigmoidRouter(Router, name="sigmoid"):
        """A router written the way a user would add one: a linear map, its top-k logits, a sigmoid gate (so the
        cross-entropy trains it), no balance statistics."""
        summary = "a test router: top-k of a linear map, sigmoid gates"

        def __init__(self, config):
            super().__init__(config)
            self.weight = torch.nn.Parameter(torch.randn(config.num_experts, config.n_embd) * config.n_embd ** -0.5)

        def forward(self, x, idx):
            logits = F.linear(x.float(), self.weight.float())
            chosen = logits.topk(self.top_k, dim=-1)
            return chosen.indices, torch.sigmoid(chosen.values), {}

    yield SigmoidRouter
    del train_gpt2.ROUTERS["sigmoid"]


def test_a_router_registered_in_a_test_file_trains(sigmoid_router, shards, tmp_path, capsys):
    flags = [*TINY, *data_flags(shards), "--num_experts", "4", "--top_k", "2", "--router", "sigmoid",
             "--num_iterations", "30", "--warmdown_iters", "10", "--val_loss_every", "15", "--seed", "3",
             "--log_dir", str(tmp_path)]
    assert "sigmoid: a test router" in train_gpt2.build_parser().format_help()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    assert train_gpt2.main(flags) == 0
    # main() put back the handlers it found: this process still stops on SIGTERM and Ctrl-C
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    _, lines = run_log(tmp_path)
    val = val_losses(lines)
    assert sorted(val) == [0, 15, 30] and val[30] < val[0] - 0.5
    reports = list(filter(None, map(parse_router_line, lines)))
    last = [fields for step, layer, fields in reports if step == 30]
    assert len(last) == 2 and not any("entropy" in f for f in last)  # it gave no such statistics
    state = torch.load(checkpoints(tmp_path)[-1])
    torch.manual_seed(3)  # the run's seed: the same initial weights
    initial = GPT(train_gpt2.parse_args(flags)).state_dict()
    for layer in range(2):  # its weights learn from the loss (the sigmoid gate carries the cross-entropy)
        name = f"transformer.h.{layer}.mlp.router.weight"
        assert not torch.equal(state["model"][name], initial[name]), name
    muon_groups = state["optimizers"][2]["param_groups"]
    assert len(muon_groups) == 2 and len(muon_groups[1]["params"]) == 2  # its weights: Muon's router group
    # the flags it cannot use are refused by the registry's generic check, naming the router that can
    capsys.readouterr()
    assert train_gpt2.main([*flags, "--aux_loss_coef", "0.01"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --router sigmoid does not use --aux_loss_coef; leave it at "
                                               "0.0, or use a router that does: learned")


def test_a_dense_model_ignores_the_router_flags(shards, tmp_path):
    """tools/bench.py times an MoE's dense counterpart with the MoE's flags: the router flags must not touch it."""
    result = run_trainer([*TINY, *data_flags(shards), "--router_bias_rate", "0.01", "--aux_loss_coef", "0.01",
                          "--balance_scope", "global", "--num_iterations", "3", "--warmdown_iters", "1",
                          "--val_loss_every", "0", "--log_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(train_losses(run_log(tmp_path)[1])) == [1, 2, 3]

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import LN_TINY_VOCAB, TINY, data_flags, run_log, torchrun, val_losses
from train_gpt2 import GPT, MLP, Hyperparameters, MoE, Muon, LearnedRouter, balance_loss, expert_matmul

C = 32


def config(**kw) -> Hyperparameters:
    return Hyperparameters(**{**dict(vocab_size=64, n_layer=2, n_head=2, n_embd=C, num_experts=4), **kw})


def randomise(moe: MoE):
    """Non-zero output projections (they start at zero) so that every path carries a signal."""
    torch.nn.init.normal_(moe.c_proj, std=0.05)
    return moe


def reference_moe(moe: MoE, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The seed's way: loop over tokens' chosen experts with plain matmuls (plus the shared expert, if any)."""
    flat = x.reshape(-1, x.size(-1))
    experts, gates, _ = moe.router(flat, idx.reshape(-1))
    out = torch.zeros_like(flat)
    for e in range(moe.num_experts):
        for j in range(moe.top_k):
            rows = experts[:, j] == e
            h = F.relu(flat[rows] @ moe.c_fc[e].T).square() @ moe.c_proj[e].T
            out = out.index_add(0, rows.nonzero().squeeze(1), h * gates[rows, j:j + 1])
    if moe.shared_expert is not None:
        out = out + F.relu(flat @ moe.shared_expert.c_fc.weight.T).square() @ moe.shared_expert.c_proj.weight.T
    return out.view_as(x)


def starve_last_expert(moe: MoE):
    """Inputs will be positive; a negative router row then never wins, even as a second choice."""
    with torch.no_grad():
        moe.router.weight[-1] = -1.0


def test_one_expert_equals_the_dense_mlp():
    torch.manual_seed(0)
    moe, mlp = randomise(MoE(config(num_experts=1))), MLP(config())
    with torch.no_grad():
        mlp.c_fc.weight.copy_(moe.c_fc[0])
        mlp.c_proj.weight.copy_(moe.c_proj[0])
    x = torch.randn(2, 8, C)
    torch.testing.assert_close(moe(x, torch.zeros(2, 8, dtype=torch.long))[0], mlp(x)[0])


@pytest.mark.parametrize("top_k", [1, 2])
def test_identical_experts_equal_the_dense_mlp(top_k):
    torch.manual_seed(0)
    moe, mlp = MoE(config(top_k=top_k)), MLP(config())
    torch.nn.init.normal_(mlp.c_proj.weight, std=0.05)
    with torch.no_grad():
        moe.c_fc.copy_(mlp.c_fc.weight.expand_as(moe.c_fc))
        moe.c_proj.copy_(mlp.c_proj.weight.expand_as(moe.c_proj))
    x = torch.randn(2, 8, C)
    y, stats = moe(x, torch.zeros(2, 8, dtype=torch.long))
    torch.testing.assert_close(y, mlp(x)[0])  # renormalised gates sum to one
    assert stats["load"].sum() == 2 * 8 * top_k


FINE_GRAINED = dict(num_experts=16, top_k=4, expert_hidden=C)  # E=16 top-4 at the dense MLP's active width


@pytest.mark.parametrize("shape, gate", [
    (dict(top_k=1), "renorm"), (dict(top_k=2), "renorm"), (dict(top_k=1), "prob"), (dict(top_k=2), "prob"),
    (FINE_GRAINED, "renorm"), (FINE_GRAINED, "prob"), ({**FINE_GRAINED, "top_k": 3, "shared_expert_hidden": C}, "prob"),
], ids=["top1-renorm", "top2-renorm", "top1-prob", "top2-prob", "E16-top4-renorm", "E16-top4-prob",
        "E16-top3-shared-prob"])
def test_outputs_and_gradients_equal_a_per_expert_loop(shape, gate):
    torch.manual_seed(0)
    moe = randomise(MoE(config(**shape, router_gate=gate)))
    starve_last_expert(moe)
    x = torch.randn(3, 10, C).abs().requires_grad_()
    idx = torch.zeros(3, 10, dtype=torch.long)
    y, stats = moe(x, idx)
    assert stats["load"][-1] == 0 and stats["load"].sum() == 30 * moe.top_k  # one expert gets no token
    y_ref = reference_moe(moe, x, idx)
    torch.testing.assert_close(y, y_ref)
    upstream = torch.randn_like(y)
    shared = list(moe.shared_expert.parameters()) if moe.shared_expert is not None else []
    params = [x, moe.c_fc, moe.c_proj, moe.router.weight, *shared]
    grads = torch.autograd.grad(y, params, upstream)
    grads_ref = torch.autograd.grad(y_ref, params, upstream)
    for name, g, g_ref in zip(["x", "c_fc", "c_proj", "router", "shared c_fc", "shared c_proj"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, msg=name, atol=1e-6, rtol=1e-5)
    # the starved expert still gets a gradient, of zeros
    assert torch.count_nonzero(grads[1][-1]) == 0 and torch.count_nonzero(grads[2][-1]) == 0
    assert all((torch.count_nonzero(grads[1][e]) > 0) == (stats["load"][e] > 0) for e in range(moe.num_experts))


def test_gates_renorm_prob_and_null_expert_bias():
    torch.manual_seed(0)
    x = torch.randn(16, C)
    idx = torch.zeros(16, dtype=torch.long)
    routers = {name: LearnedRouter(config(**kw)) for name, kw in [
        ("renorm1", dict()), ("renorm2", dict(top_k=2)), ("prob2", dict(top_k=2, router_gate="prob")),
        ("null1", dict(null_expert_bias=10.0)), ("null2", dict(top_k=2, null_expert_bias=0.5))]}
    weight = routers["renorm1"].weight
    probs = (x @ weight.T).softmax(-1)
    for r in routers.values():
        r.weight.data.copy_(weight)
    top1, top2 = probs.topk(1, -1).values, probs.topk(2, -1).values
    assert torch.equal(routers["renorm1"](x, idx)[1], torch.ones(16, 1))
    torch.testing.assert_close(routers["renorm2"](x, idx)[1], top2 / top2.sum(-1, keepdim=True))
    torch.testing.assert_close(routers["prob2"](x, idx)[1], top2)
    torch.testing.assert_close(routers["null1"](x, idx)[1], top1 / (top1 + 10.0))
    torch.testing.assert_close(routers["null2"](x, idx)[1], top2 / (top2.sum(-1, keepdim=True) + 0.5))
    experts = routers["renorm2"](x, idx)[0]
    torch.testing.assert_close(experts, probs.topk(2, -1).indices)


def test_renorm_top1_gives_the_router_exactly_zero_cross_entropy_gradient():
    torch.manual_seed(0)
    for gate, expect_zero in [("renorm", True), ("prob", False)]:
        model = GPT(config(router_gate=gate))
        for block in model.transformer.h:
            randomise(block.mlp)
        torch.nn.init.normal_(model.lm_head.weight, std=0.05)
        loss, _ = model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
        grads = torch.autograd.grad(loss, [b.mlp.router.weight for b in model.transformer.h])
        assert all((torch.count_nonzero(g) == 0) == expect_zero for g in grads), gate


def test_router_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    router = LearnedRouter(config(top_k=2, router_gate="prob"))
    x = torch.randn(8, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, gates, stats = router(x, torch.zeros(8, dtype=torch.long))
    assert gates.dtype == stats["prob"].dtype == torch.float32
    torch.testing.assert_close(gates, (x @ router.weight.T).softmax(-1).topk(2, -1).values)


def test_balance_loss_is_one_per_layer_for_a_uniform_router_and_E_when_collapsed():
    E, L = 4, 3
    uniform = torch.full((L, E), 0.25)
    assert balance_loss(torch.full((L, E), 100.0), uniform).item() == pytest.approx(L)
    # a router with zero weights has uniform probabilities; whatever it picks, the loss is 1 per layer
    model = GPT(config(n_layer=L))
    for block in model.transformer.h:
        block.mlp.router.weight.data.zero_()
    _, stats = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    assert balance_loss(stats["load"], stats["prob"]).item() == pytest.approx(L)
    collapsed = torch.zeros(L, E)
    collapsed[:, 0] = 1.0
    assert balance_loss(collapsed * 50, collapsed).item() == pytest.approx(L * E)


def test_hash_router_sends_token_t_to_t_mod_E():
    moe = randomise(MoE(config(router="hash")))
    assert not list(moe.router.parameters())
    idx = torch.arange(40).view(2, 20)
    experts, gates, _ = moe.router(torch.randn(40, C), idx.view(-1))
    assert torch.equal(experts.view(-1), torch.arange(40) % 4) and torch.equal(gates, torch.ones(40, 1))
    _, stats = moe(torch.randn(2, 20, C), idx)
    assert stats["load"].tolist() == [10.0, 10.0, 10.0, 10.0]


def test_experts_are_initialised_like_the_dense_mlp():
    torch.manual_seed(0)
    moe = MoE(Hyperparameters(n_embd=768, num_experts=4))
    assert moe.c_fc.shape == (4, 3072, 768) and moe.c_proj.shape == (4, 768, 3072)
    assert torch.count_nonzero(moe.c_proj) == 0
    bound = 768 ** -0.5  # nn.Linear(768, 3072)'s uniform bound
    assert moe.c_fc.abs().max() <= bound and moe.c_fc.abs().max() > 0.99 * bound
    assert moe.c_fc.std().item() == pytest.approx(MLP(Hyperparameters()).c_fc.weight.std().item(), rel=0.01)
    assert not torch.equal(moe.c_fc[0], moe.c_fc[1])


def test_muon_on_an_expert_stack_equals_muon_on_each_expert():
    torch.manual_seed(0)
    stack = torch.nn.Parameter(torch.randn(4, 24, 16))
    singles = [torch.nn.Parameter(stack[e].detach().clone()) for e in range(4)]
    stacked_opt = Muon([stack], lr=0.05, ns_dtype=torch.float32)
    single_opt = Muon(singles, lr=0.05, ns_dtype=torch.float32)
    for _ in range(3):
        grad = torch.randn(4, 24, 16) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(4, 1, 1)  # norms differ
        stack.grad = grad
        for e, p in enumerate(singles):
            p.grad = grad[e].clone()
        stacked_opt.step()
        single_opt.step()
    for e in range(4):
        torch.testing.assert_close(stack[e], singles[e], atol=1e-6, rtol=1e-6)


def test_expert_matmul_matches_a_loop_including_empty_groups():
    torch.manual_seed(0)
    x, w = torch.randn(10, 8), torch.randn(4, 6, 8)
    offs = torch.tensor([3, 3, 8, 10], dtype=torch.int32)
    bounds = [0, 3, 3, 8, 10]
    expected = torch.cat([x[bounds[g]:bounds[g + 1]] @ w[g].T for g in range(4)])
    torch.testing.assert_close(expert_matmul(x, w, offs), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_block_compiles_with_fullgraph(dtype):
    """No host sync and no data-dependent Python in the block: dynamo traces it as one graph.
    bf16 takes the grouped GEMM; float32 takes the masked fallback (grouped_mm traces in bf16 only)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = randomise(MoE(config(top_k=2, router_gate="prob"))).to(dtype)
    starve_last_expert(moe)
    x, idx = torch.randn(2, 16, C, dtype=dtype).abs(), torch.zeros(2, 16, dtype=torch.long)
    compiled = torch.compile(moe, fullgraph=True)
    y, stats = compiled(x, idx)
    y_eager, _ = moe(x, idx)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(y, y_eager, **tol)
    y.float().square().sum().backward()
    assert moe.c_fc.grad is not None and moe.router.weight.grad is not None
    assert torch.count_nonzero(moe.c_fc.grad[-1]) == 0  # the starved expert: zero, but present


@pytest.mark.parametrize("flags", [
    ["--top_k", "1", "--router_gate", "renorm", "--aux_loss_coef", "0.01"],  # the seed's configuration
    ["--top_k", "2", "--router_gate", "prob", "--aux_loss_coef", "0"],
    ["--router", "hash"],
    ["--num_experts", "16", "--top_k", "4", "--expert_hidden", "8", "--shared_expert_hidden", "16",
     "--aux_loss_coef", "0.01"],  # fine-grained experts and a shared one
], ids=["seed", "top2-prob", "hash", "E16-top4-shared"])
def test_two_process_moe_run_learns(shards, tmp_path, flags):
    """DDP without find_unused_parameters: it fails if any parameter misses a gradient in a step."""
    experts = int(flags[flags.index("--num_experts") + 1]) if "--num_experts" in flags else 4
    args = [*TINY, *data_flags(shards), "--num_experts", "4", *flags, "--num_iterations", "40",
            "--warmdown_iters", "10", "--val_loss_every", "20", "--log_dir", str(tmp_path)]
    result = torchrun(2, args)
    assert result.returncode == 0, result.stderr[-3000:]
    _, lines = run_log(tmp_path)
    val = val_losses(lines)
    assert abs(val[0] - LN_TINY_VOCAB) < 1e-3 and val[40] < val[0] - 1.0, val
    router_lines = [l for l in lines if l.startswith("step:") and " router layer:" in l]
    assert len(router_lines) == 3 * 2  # three validations, two layers: one line per layer, whatever E
    fields = dict(f.split(":", 1) for f in router_lines[-1].split()[2:])
    loads = [float(v) for v in fields["val_load"].split(",")]
    assert len(loads) == experts and math.isclose(sum(loads), 1.0, abs_tol=1e-3)
    if "hash" in flags:
        assert "entropy" not in fields
    else:
        assert 0 < float(fields["entropy"]) <= 1
        top_k = int(flags[flags.index("--top_k") + 1]) if "--top_k" in flags else 1
        gate_sum = float(fields["gate_mean"]) * top_k  # a token's gates summed: 1 under renorm, below 1 under prob
        assert (0 < gate_sum < 0.99) if "prob" in flags else math.isclose(gate_sum, 1, rel_tol=1e-3), gate_sum


def test_moe_flags_default_to_the_dense_record():
    a = Hyperparameters()
    assert (a.num_experts, a.top_k, a.router, a.router_gate, a.null_expert_bias, a.aux_loss_coef) == \
        (1, 1, "learned", "renorm", 0.0, 0.0)
    assert all(not isinstance(b.mlp, MoE) for b in GPT(Hyperparameters(n_layer=2)).transformer.h)


def test_a_shared_expert_adds_a_dense_mlp_to_the_routed_output():
    torch.manual_seed(0)
    with_shared = randomise(MoE(config(**FINE_GRAINED, shared_expert_hidden=48)))
    torch.nn.init.normal_(with_shared.shared_expert.c_proj.weight, std=0.05)
    routed_only = MoE(config(**FINE_GRAINED))
    routed_only.load_state_dict({k: v for k, v in with_shared.state_dict().items() if "shared" not in k})
    mlp = MLP(config(), hidden=48)
    mlp.load_state_dict(with_shared.shared_expert.state_dict())
    assert mlp.c_fc.weight.shape == (48, C)
    x, idx = torch.randn(2, 8, C), torch.zeros(2, 8, dtype=torch.long)
    torch.testing.assert_close(with_shared(x, idx)[0], routed_only(x, idx)[0] + mlp(x)[0])


def test_fine_grained_and_shared_experts_start_like_dense_mlps_of_their_shape():
    torch.manual_seed(0)
    moe = MoE(Hyperparameters(n_embd=768, num_experts=16, top_k=3, expert_hidden=768, shared_expert_hidden=1024))
    assert moe.c_fc.shape == (16, 768, 768) and moe.c_proj.shape == (16, 768, 768)
    assert moe.shared_expert.c_fc.weight.shape == (1024, 768)
    assert torch.count_nonzero(moe.c_proj) == 0 and torch.count_nonzero(moe.shared_expert.c_proj.weight) == 0
    bound = 768 ** -0.5  # nn.Linear(768, H)'s bound whatever H: it depends on fan-in only
    for w in (moe.c_fc, moe.shared_expert.c_fc.weight):
        assert bound * 0.99 < w.abs().max() <= bound
    model = GPT(Hyperparameters(vocab_size=64, n_layer=2, n_head=2, n_embd=C, num_experts=16, top_k=3, expert_hidden=16,
                          shared_expert_hidden=16))
    loss, _ = model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
    assert loss.item() == pytest.approx(math.log(64), abs=1e-6)  # zero out-projections: the loss at step 0


def test_muon_scales_each_matrix_by_its_own_shape():
    """A wide expert [E, 4C, C] and a narrow one [E, C/2, C] get the update scale of their own shape,
    max(1, rows/cols) ** 0.5, per expert: after one step from zero with momentum 0 the RMS of the update is that
    scale times the orthogonalised RMS, (min(rows, cols) / (rows * cols)) ** 0.5 up to Newton-Schulz's band."""
    torch.manual_seed(0)
    for rows, cols in [(4 * C, C), (C // 2, C), (C, 4 * C)]:
        p = torch.nn.Parameter(torch.zeros(3, rows, cols))
        p.grad = torch.randn(3, rows, cols)
        Muon([p], lr=1.0, momentum=0.0, nesterov=False, ns_dtype=torch.float32).step()
        scale = max(1, rows / cols) ** 0.5
        orth_rms = (min(rows, cols) / (rows * cols)) ** 0.5
        for e in range(3):
            rms = p[e].square().mean().sqrt().item() / (scale * orth_rms)
            assert 0.6 < rms < 1.25, (rows, cols, rms)


def test_router_warnings_are_one_line_per_layer_at_any_E():
    from train_gpt2 import Runtime, report_routers
    E, lines = 64, []
    load = torch.ones(2, E)
    load[0, [3, 7, 9]] = 0  # three starving experts in layer 0, none in layer 1
    rt = Runtime(rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32, compile_model=False)
    report_routers(5, load, dict(load=load, gate=torch.ones(2)), None, Hyperparameters(num_iterations=10), rt,
                   lambda line, console=True: lines.append(line))
    warnings = [l for l in lines if "warning" in l]
    assert len(lines) == 3 and len(warnings) == 1
    assert lines[0].startswith("step:5/10 router layer:0 train_load:") and "gate_mean:1" in lines[0]
    assert warnings[0] == ("step:5/10 warning: layer 0 experts 3,7,9 val_load 0.0000,0.0000,0.0000 below a quarter "
                           "of uniform (0.0039)")


def test_the_slow_path_is_announced_once_in_the_log(tmp_path):
    from train_gpt2 import Runtime, RunLog

    def setup_lines(compiled: bool, dtype: torch.dtype, experts: int) -> list[str]:
        args = Hyperparameters(num_experts=experts, log_dir=str(tmp_path / f"{compiled}{dtype}{experts}"))
        rt = Runtime(rank=0, world_size=1, device=torch.device("cpu"), dtype=dtype, compile_model=compiled)
        log = RunLog(args, rt)
        return [l for l in open(log.path).read().splitlines() if l.startswith("warning")]

    (warning,) = setup_lines(True, torch.float32, 4)
    assert warning == ("warning: the MoE's slow path, every expert on every token (4x the FLOPs): torch.compile "
                       "traces grouped_mm in bf16 only (use --dtype bfloat16, or --no-compile)")
    assert setup_lines(True, torch.bfloat16, 4) == setup_lines(False, torch.float32, 4) == []
    assert setup_lines(True, torch.float32, 1) == []  # the dense model has no experts


def readme_configurations() -> list[tuple[str, dict, float, float]]:
    """The README's table of MoE shapes at the dense model's active width: (label, flags, total M, active M)."""
    import re
    from conftest import ROOT
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| configuration | command | total parameters | active parameters |"):].split("\n\n")[0]
    rows = []
    for line in table.splitlines()[2:]:
        label, command, total, active = [cell.strip(" `") for cell in line.strip("|").split("|")]
        flags = dict(re.findall(r"--(\w+) (\S+)", command))
        config = dict(num_experts=4, top_k=1) if "run_moe.sh" in command else {}  # run_moe.sh's own flags
        config.update({k: int(v) for k, v in flags.items()})
        rows.append((label, config, float(total.rstrip("M")), float(active.rstrip("M"))))
    return rows


def test_readme_configurations_have_the_dense_models_active_mlp_flops_and_their_stated_sizes():
    from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula
    if torch.ops.aten._grouped_mm not in flop_registry:  # torch counts no FLOPs for it: 2 x rows x in x out
        register_flop_formula(torch.ops.aten._grouped_mm)(
            lambda a_shape, b_shape, *args, **kwargs: 2 * a_shape[0] * a_shape[1] * b_shape[-1])
    rows = readme_configurations()
    assert [r[0] for r in rows][:2] == ["dense (the record)", "E=4 top-1 H=3072 (the seed)"] and len(rows) >= 5
    tokens = 16
    flops = {}
    for label, flags, total_m, active_m in rows:
        config = Hyperparameters(**flags)
        with torch.device("meta"):  # exact parameter counts of the full model, without its memory
            model = GPT(config)
        total = sum(p.numel() for p in model.parameters())
        mlp = model.transformer.h[0].mlp
        inactive = 0 if config.num_experts == 1 else (config.num_experts - config.top_k) * (mlp.c_fc[0].numel() + mlp.c_proj[0].numel())
        active = total - config.n_layer * inactive
        assert (round(total / 1e6, 1), round(active / 1e6, 1)) == (total_m, active_m), label
        torch.manual_seed(0)
        layer = MLP(config) if config.num_experts == 1 else MoE(config)
        x = torch.randn(1, tokens, config.n_embd)
        with FlopCounterMode(display=False) as counter:
            layer(x, torch.zeros(1, tokens, dtype=torch.long))
        counts = counter.get_flop_counts()
        router = sum(counts.get("MoE.router", {}).values())
        assert router == 2 * tokens * config.n_embd * config.num_experts * (config.num_experts > 1), label
        flops[label] = (counter.get_total_flops() - router) / tokens
    dense = flops.pop("dense (the record)")
    assert dense == 2 * 2 * 768 * 3072  # forward: two matmuls of 768 x 3072 per token
    assert flops == {label: dense for label in flops}

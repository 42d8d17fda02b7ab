"""--mlp_output_scale: a constant on the MLP branch, and what it is in optimizer terms."""
import functools

import pytest
import torch

import train_gpt2

from conftest import TINY, data_flags, run_log, run_trainer, train_losses
from train_gpt2 import GPT, Hyperparameters, Muon, make_optimizers

SMALL = dict(vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def out_projection(name: str) -> bool:
    return name.endswith("mlp.c_proj") or name.endswith("mlp.c_proj.weight") or "shared_expert.c_proj" in name


def train(model: GPT, optimizers, steps: int, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 64, (4, 16), generator=gen)
        y = (x * 7 + 3) % 64  # a learnable map
        loss, stats = model(x, y)
        losses.append(loss.item())
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return losses


def muon_with_scaled_out_projections(model: GPT, args: Hyperparameters, lr_scale: float, dtype) -> list:
    """make_optimizers(), except that the MLP out-projections form a Muon group of lr x lr_scale."""
    optimizers = make_optimizers(model, args, dtype)
    named = dict(model.transformer.h.named_parameters())
    scaled = [p for n, p in named.items() if out_projection(n)]
    rest = [p for n, p in named.items() if not out_projection(n) and ".router." not in n]
    routers = [p for n, p in named.items() if ".router." in n]
    groups = [dict(params=rest), dict(params=scaled, lr=args.muon_lr * lr_scale)]
    groups += [dict(params=routers, lr=args.router_lr)] if routers else []
    optimizers[2] = Muon(groups, lr=args.muon_lr, momentum=args.muon_momentum, ns_dtype=dtype)
    return optimizers


MODELS = {
    "dense": dict(),
    "moe-renorm": dict(num_experts=4, top_k=1),
    "moe-st-shared": dict(num_experts=4, top_k=2, router_gate="st", shared_expert_hidden=32),
}


def trajectories(model_kw: dict, s: float, steps: int = 20, dtype=torch.float32) -> dict:
    """Train three copies of one initialisation: the branch scaled by s; unscaled with the out-projections'
    Muon lr x s; unscaled with the plain lr (the control). Returns each one's losses and model."""
    args = Hyperparameters(**SMALL, **model_kw, muon_lr=0.05)
    torch.manual_seed(0)
    scaled = GPT((Hyperparameters(**SMALL, **model_kw, mlp_output_scale=s)))
    plain, control = GPT(args), GPT(args)
    plain.load_state_dict(scaled.state_dict())
    control.load_state_dict(scaled.state_dict())
    return dict(scaled=(train(scaled, make_optimizers(scaled, args, dtype), steps), scaled),
                lr_scaled=(train(plain, muon_with_scaled_out_projections(plain, args, s, dtype), steps), plain),
                control=(train(control, make_optimizers(control, args, dtype), steps), control))


@pytest.mark.parametrize("model_kw", MODELS.values(), ids=MODELS.keys())
def test_output_scale_equals_scaling_the_out_projections_muon_lr(model_kw, monkeypatch):
    """With Muon and zero-initialised out-projections, y = s W f(x) at lr follows the trajectory of y = W' f(x)
    at lr x s with W' = s W: Muon's update does not depend on the gradient's scale, so s W moves by s x lr x the
    update W' gets, from the same start, zero. 'Does not depend' holds up to the eps = 1e-7 in Muon's
    normalisation G / (|G| + eps), which weighs 1/s times more on the scaled model's s-times-smaller gradients:
    the losses still agree to ~1e-6 over 20 steps. With eps made negligible, in float64, every parameter agrees
    to ~1e-14 (with eps: ~1e-4). In float32 the parameters agree only to rounding, which Newton-Schulz amplifies
    where a gradient has few directions (an expert that saw few tokens): 5e-6 for dense, 4e-4 for the renorm
    MoE after 20 steps, not a difference of the two models (measured; float64 shows it)."""
    s = 0.05
    runs = trajectories(model_kw, s)
    (scaled, _), (lr_scaled, _), (control, _) = runs["scaled"], runs["lr_scaled"], runs["control"]
    assert scaled[-1] < scaled[0] - 0.5  # it trained
    gap = max(abs(a - b) for a, b in zip(scaled, lr_scaled))
    assert gap < 1e-5, gap
    # the lr scale is what makes them equal: without it the losses part at once, by far more than the gap
    assert max(abs(a - b) for a, b in zip(scaled, control)) > 100 * max(gap, 1e-6)

    original = train_gpt2.zeropower_via_newtonschulz5
    monkeypatch.setattr(train_gpt2, "zeropower_via_newtonschulz5", functools.partial(original, eps=1e-30))
    monkeypatch.setattr(train_gpt2, "grouped_mm", None)  # float64: the per-expert matmuls (no float64 grouped GEMM)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        runs = trajectories(model_kw, s, dtype=torch.float64)
    finally:
        torch.set_default_dtype(default)
    lr_scaled_params = dict(runs["lr_scaled"][1].named_parameters())
    for name, p in runs["scaled"][1].named_parameters():
        expected = lr_scaled_params[name] / s if out_projection(name) else lr_scaled_params[name]
        torch.testing.assert_close(p, expected, atol=1e-10, rtol=0, msg=name)


def test_scale_one_is_the_unscaled_model_bit_for_bit():
    torch.manual_seed(0)
    a = GPT(Hyperparameters(**SMALL, num_experts=4))
    for block in a.transformer.h:  # non-zero out-projections and head, so that the MLP branch shows
        torch.nn.init.normal_(block.mlp.c_proj, std=0.05)
    torch.nn.init.normal_(a.lm_head.weight, std=0.05)
    b, half = GPT(Hyperparameters(**SMALL, num_experts=4, mlp_output_scale=1.0)), GPT(
        Hyperparameters(**SMALL, num_experts=4, mlp_output_scale=0.5))
    b.load_state_dict(a.state_dict())
    half.load_state_dict(a.state_dict())
    x = torch.randint(0, 64, (2, 16))
    assert torch.equal(a(x, x)[0], b(x, x)[0])
    assert not torch.equal(a(x, x)[0], half(x, x)[0])


def test_output_scale_multiplies_the_mlp_branch():
    torch.manual_seed(0)
    model = GPT(Hyperparameters(**SMALL, mlp_output_scale=0.25))
    block = model.transformer.h[0]
    torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.05)
    x = torch.randn(2, 8, 32)
    after_attn = x + block.attn(torch.nn.functional.rms_norm(x, (32,)))
    expected = after_attn + 0.25 * block.mlp(torch.nn.functional.rms_norm(after_attn, (32,)))[0]
    torch.testing.assert_close(block(x, torch.zeros(2, 8, dtype=torch.long))[0], expected)


def test_a_run_with_an_output_scale_trains(shards, tmp_path):
    result = run_trainer([*TINY, *data_flags(shards), "--num_experts", "4", "--mlp_output_scale", "0.05",
                          "--num_iterations", "20", "--warmdown_iters", "5", "--val_loss_every", "0",
                          "--log_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = run_log(tmp_path)[1]
    assert "'mlp_output_scale': 0.05" in next(l for l in lines if l.startswith("hyperparameters:"))
    losses = train_losses(lines)
    assert losses[20] < losses[1] - 0.5

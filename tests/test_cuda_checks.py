"""The checks of tests/test_cuda.py on the CPU: each passes on the right computation and fails on a planted fault.
(On a GPU they judge the compiled kernels; here eager stand-ins take their place.)"""
import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cuda_checks import (check_moe_block, check_newton_schulz, ddp_steps_with_an_idle_expert, normalised_tokens,
                         relative_error)
from train_gpt2 import MoE, Hyperparameters, expert_matmul, zeropower_via_newtonschulz5


def newton_schulz_with(a=3.4445, b=-4.7750, c=2.0315, norm_scale=1.0, one_norm_for_the_stack=False):
    """Newton-Schulz written another way (the same maths, other rounding), or with one planted fault."""
    def ns(G, steps=5, dtype=torch.bfloat16):
        X = G.to(dtype)
        norm = X.norm() if one_norm_for_the_stack else X.norm(dim=(-2, -1), keepdim=True)
        X = X / (norm_scale * norm + 1e-7)
        X = X.mT if G.size(-2) > G.size(-1) else X
        for _ in range(steps):
            A = X @ X.mT
            X = a * X + (b * A + c * A @ A) @ X
        return X.mT if G.size(-2) > G.size(-1) else X
    return ns


@pytest.fixture(scope="module")
def gradient_like():
    return torch.randn(3072, 768, generator=torch.Generator().manual_seed(0))


def test_newton_schulz_check_passes_a_right_bf16_implementation(gradient_like):
    result = check_newton_schulz(zeropower_via_newtonschulz5, gradient_like)  # eager stands for compiled
    assert 0.01 < result["spread"] < 0.04  # the measured bf16 spread the tolerance is built on
    rounded_differently = check_newton_schulz(newton_schulz_with(), gradient_like)  # other op order, same maths
    assert rounded_differently["error"] <= 2 * rounded_differently["spread"]


@pytest.mark.parametrize("fault, candidate", [
    ("4 steps", lambda G, steps, dtype: zeropower_via_newtonschulz5(G, steps=4, dtype=dtype)),
    ("a = 3.3", newton_schulz_with(a=3.3)),
    ("c = 2.2", newton_schulz_with(c=2.2)),
    ("normalised by 2x the norm", newton_schulz_with(norm_scale=2.0)),
    ("scaled by 1.1", lambda G, steps, dtype: 1.1 * zeropower_via_newtonschulz5(G, steps=steps, dtype=dtype)),
    ("fp32, not bf16", lambda G, steps, dtype: zeropower_via_newtonschulz5(G, steps=steps, dtype=torch.float32)),
])
def test_newton_schulz_check_fails_a_planted_fault(gradient_like, fault, candidate):
    with pytest.raises(AssertionError):
        check_newton_schulz(candidate, gradient_like)


def test_newton_schulz_check_on_an_expert_stack_fails_one_norm_for_the_whole_stack():
    stack = torch.randn(3, 1536, 384, generator=torch.Generator().manual_seed(1))  # quarter size: the band holds
    stack[0] *= 10  # experts' gradients differ in size
    check_newton_schulz(zeropower_via_newtonschulz5, stack)
    with pytest.raises(AssertionError):
        check_newton_schulz(newton_schulz_with(one_norm_for_the_stack=True), stack)


def moe_and_tokens():
    torch.manual_seed(0)
    moe = MoE(Hyperparameters(vocab_size=512, n_embd=256, num_experts=4, top_k=1))
    torch.nn.init.normal_(moe.c_proj, std=0.02)
    return moe, *normalised_tokens(256, torch.device("cpu"), batch=2, length=128)


def looped_block(moe, square=True):
    """The MoE block written another way, as a correct candidate must be: a loop over experts whose first
    projection accumulates in fp32 and rounds once to bf16, so it rounds differently from the block's grouped GEMM.
    square=False plants a fault (ReLU, not ReLU^2)."""
    def block(x, idx):
        B, T, C = x.shape
        flat = x.reshape(B * T, C)
        experts, gates, _ = moe.router(flat, idx.reshape(B * T))
        y = torch.zeros(B * T, C, dtype=torch.bfloat16)
        for e in range(moe.num_experts):
            token, slot = (experts == e).nonzero(as_tuple=True)
            with torch.autocast("cpu", enabled=False):  # (autocast would make it a bf16 matmul again)
                h = torch.relu(flat[token].float() @ moe.c_fc[e].float().T).bfloat16()
            out = (h.square() if square else h) @ moe.c_proj[e].bfloat16().T
            y.index_add_(0, token, out * gates[token, slot, None].bfloat16())
        return y.view(B, T, C), {}
    return block


def test_moe_block_check_passes_the_block_and_fails_planted_faults():
    moe, x, idx = moe_and_tokens()
    result = check_moe_block(looped_block(moe), moe, x, idx)  # a correct block that rounds its own way
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.equal(looped_block(moe)(x, idx)[0], moe(x, idx)[0])  # so the check compares two outputs
    assert 0 < result["error"] < 0.01 and result["spread"] < 0.01
    with pytest.raises(AssertionError):
        check_moe_block(looped_block(moe, square=False), moe, x, idx)

    def unsorted(x, idx):  # the experts' rows never scattered back to token order
        B, T, C = x.shape
        experts, gates, _ = moe.router(x.reshape(B * T, C), idx.reshape(B * T))
        order = torch.argsort(experts.flatten(), stable=True)
        offs = torch.bincount(experts.flatten(), minlength=4).cumsum(0).to(torch.int32)
        dtype = torch.bfloat16
        h = expert_matmul(x.reshape(B * T, C)[order].to(dtype), moe.c_fc.to(dtype), offs)
        return expert_matmul(torch.relu(h).square(), moe.c_proj.to(dtype), offs).view(B, T, C), {}

    swapped = copy.deepcopy(moe)  # each group multiplied by the next expert's weights
    swapped.c_fc.data = moe.c_fc.data.roll(1, dims=0)
    for fault in (unsorted, swapped, lambda x, idx: (moe(x, idx)[0] * 1.02, {})):
        with pytest.raises(AssertionError):
            check_moe_block(fault, moe, x, idx)


def ddp_worker(rank: int, world_size: int, init_file: str, out: str, fault_rank):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        ddp_steps_with_an_idle_expert(rank, world_size, torch.device("cpu"), fault_on_rank=fault_rank)
        message = "ok"
    except AssertionError as e:
        message = str(e)
    with open(f"{out}.{rank}", "w") as f:
        f.write(message)
    dist.barrier()
    dist.destroy_process_group()
    # skip the interpreter's teardown, where gloo's threads abort ~1 process in 20 (as train_gpt2.py's exit)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("fault_rank", [None, 0], ids=["idle-expert", "planted-gradient-on-rank-0"])
def test_ddp_idle_expert_check_on_two_gloo_ranks(tmp_path, fault_rank):
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "result"), fault_rank), nprocs=2)
    results = [(tmp_path / f"result.{r}").read_text() for r in range(2)]
    if fault_rank is None:
        assert results == ["ok", "ok"]
    else:  # the clean rank sees the stray gradient too, through DDP's all-reduce
        assert results == [f"rank {r} step 0 layer 0: the idle expert's c_fc gradient is not zero" for r in (0, 1)]


def test_relative_error_is_frobenius():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])
    assert relative_error(b, a) == 1.0 and relative_error(a + 0.5, a) == pytest.approx(0.5 * 2 ** 0.5 / 5)

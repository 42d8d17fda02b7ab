"""What only a GPU shows: the CUDA grouped GEMM in bf16, the compiled MoE block and step (no graph break, no host
sync), the record's GPU settings and compiled Newton-Schulz, DDP over NCCL with an idle expert.

Skipped without CUDA; `python tools/gpu_check.py` runs them first on a GPU machine and fails if fewer pass than
this file holds. The checks live in tests/cuda_checks.py, where each tolerance says how it was derived, and
tests/test_cuda_checks.py shows on a CPU that each check fails on a planted fault. Compiles, for the check's
plan: the grouped GEMM twice (a static, then a dynamic shape), the MoE block, the 2-layer model, Newton-Schulz.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cuda_checks import (BF16_EPS, check_moe_block, check_newton_schulz, ddp_steps_with_an_idle_expert,
                         idle_expert_model, normalised_tokens, relative_error)
from train_gpt2 import GPT, MoE, Hyperparameters, balance_loss, expert_matmul, make_optimizers, setup_runtime

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

C, H = 768, 3072  # full width: the shapes the trainer runs
SDP_BACKENDS = ("flash", "mem_efficient", "math", "cudnn")


@pytest.fixture(autouse=True)
def process_settings():
    """setup_runtime changes process-wide settings (attention backends, inductor tuning); every test starts from
    torch's defaults and puts back what it found, so no test depends on which ran before it."""
    import torch._inductor.config as inductor_config
    saved = ({b: getattr(torch.backends.cuda, f"{b}_sdp_enabled")() for b in SDP_BACKENDS},
             inductor_config.coordinate_descent_tuning)
    for backend in SDP_BACKENDS:
        getattr(torch.backends.cuda, f"enable_{backend}_sdp")(True)
    inductor_config.coordinate_descent_tuning = False
    torch._dynamo.reset()
    yield
    for backend, enabled in saved[0].items():
        getattr(torch.backends.cuda, f"enable_{backend}_sdp")(enabled)
    inductor_config.coordinate_descent_tuning = saved[1]
    torch.cuda.set_sync_debug_mode("default")
    torch._dynamo.reset()


def loop_matmul(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each expert's run of rows times its weight, one plain float32 matmul per expert."""
    starts = [sum(counts[:g]) for g in range(len(counts) + 1)]
    return torch.cat([x[starts[g]:starts[g + 1]].float() @ w[g].float().T for g in range(len(counts))])


SKEWED = {  # tokens per expert: empty experts, one token, sizes that are not multiples of 8 or 16
    "empty-one-odd": [0, 1, 7, 1000],
    "not-multiples-of-8": [13, 3, 129, 5],
    "all-on-one": [0, 0, 1024, 0],
    "aligned": [256, 256, 256, 256],
}


@pytest.mark.parametrize("counts", SKEWED.values(), ids=SKEWED.keys())
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_grouped_gemm_bf16_forward_and_backward_equal_a_loop(counts, compiled):
    """The CUTLASS grouped GEMM (sm90, bf16) against per-expert fp32 matmuls of the same bf16 numbers, so the only
    differences are the output's rounding to bf16 and the order of fp32 accumulation: on a CPU the grouped GEMM
    lands 0.17% away, a quarter of bf16's eps (0.78%), which is the tolerance. Known grouped-GEMM paths need
    16-byte aligned groups in some layouts (a device-side assert); the odd counts show whether ours does."""
    torch.manual_seed(0)
    E, N = len(counts), sum(counts)
    x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.rand(E, H, C, device="cuda") * 2 - 1).mul(C ** -0.5).bfloat16().requires_grad_()
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    fn = torch.compile(expert_matmul, fullgraph=True) if compiled else expert_matmul
    y = fn(x, w, offs)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    x_ref, w_ref = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y_ref = loop_matmul(x_ref, w_ref, counts)
    y_ref.backward(upstream.float())
    torch.cuda.synchronize()  # a device-side assert surfaces here
    assert y.dtype == torch.bfloat16 and relative_error(y, y_ref) < BF16_EPS
    assert relative_error(x.grad, x_ref.grad) < BF16_EPS
    for g, n in enumerate(counts):  # every expert's weight gradient, an empty expert's exactly zero
        if n == 0:
            assert torch.count_nonzero(w.grad[g]) == 0
        else:
            assert relative_error(w.grad[g], w_ref.grad[g]) < BF16_EPS, (g, n)


def test_the_compiled_moe_block_is_as_close_to_fp32_as_eager_bf16():
    """The block compiled with fullgraph (no graph break), its out-projection non-zero so that routing, the
    grouped GEMMs, the scatter back and the gate all show in the output, one expert idle."""
    torch.manual_seed(0)
    moe = MoE(Hyperparameters(vocab_size=512, n_embd=C, num_experts=4, top_k=1)).cuda()
    torch.nn.init.normal_(moe.c_proj, std=0.02)
    moe.router.bias[3] = -10.0
    x, idx = normalised_tokens(C, torch.device("cuda"))
    result = check_moe_block(torch.compile(moe, fullgraph=True), moe, x, idx)
    print(f"compiled MoE block: {result['error']:.4f} from fp32, eager bf16 {result['spread']:.4f}")


def test_the_compiled_moe_step_needs_no_host_sync_and_leaves_an_idle_expert_a_zero_gradient():
    """The 2-layer MoE model compiled with fullgraph runs forward, backward and every optimizer step under sync
    debug mode 'error': any device-to-host copy (.item(), nonzero, a data-dependent shape) raises."""
    torch.manual_seed(0)
    args = Hyperparameters(vocab_size=512, n_layer=2, n_embd=C, num_experts=4, top_k=1, aux_loss_coef=0.01)
    model = idle_expert_model(args, "cuda")
    for block in model.transformer.h:
        torch.nn.init.normal_(block.mlp.c_proj, std=0.02)
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # so that the blocks get a gradient at once
    optimizers = make_optimizers(model, args, torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randint(0, 512, (8, 256), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, stats = compiled(x, x)
            loss = loss + args.aux_loss_coef * balance_loss(stats["load"], stats["prob"])
        loss.backward()
        return loss.detach(), stats

    first, stats = step()  # compilation, and the optimizers' lazy state, outside the sync check
    assert stats["load"][:, 3].sum() == 0
    for block in model.transformer.h:
        assert torch.count_nonzero(block.mlp.c_fc.grad[3]) == 0 and torch.count_nonzero(block.mlp.c_proj.grad[3]) == 0
        assert torch.count_nonzero(block.mlp.c_fc.grad[0]) > 0
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    for _ in range(3):
        last, _ = step()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(last) and last < first


def test_the_records_gpu_settings_and_cudnn_attention_forward_and_backward():
    """cuDNN attention with flash, memory-efficient and math disabled (recent torch tries flash first, so only
    this runs cuDNN), at the trainer's shape (head dim 128), forward and backward; coordinate-descent tuning;
    Newton-Schulz compiled as the trainer compiles it, judged against fp32 (tests/cuda_checks.py)."""
    import torch._inductor.config as inductor_config
    os.environ.pop("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", None)
    rt = setup_runtime(Hyperparameters())
    assert rt.attention == "cudnn", rt.attention  # the probe ran cuDNN attention with nothing else enabled
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert not (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
                or torch.backends.cuda.math_sdp_enabled())
    assert rt.compile_model and inductor_config.coordinate_descent_tuning and rt.dtype == torch.bfloat16
    q, k, v = (torch.randn(2, 6, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    F.scaled_dot_product_attention(q, k, v, is_causal=True).float().square().mean().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    model = GPT(Hyperparameters(vocab_size=512, n_layer=1)).cuda()
    muon = make_optimizers(model, Hyperparameters(), rt.dtype, compile_ns=rt.compile_model)[2]
    G = torch.randn(H, C, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    result = check_newton_schulz(muon.zeropower, G)
    print(f"compiled Newton-Schulz: {result['error']:.4f} from fp32, eager bf16 {result['spread']:.4f}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nccl_worker(rank: int, world_size: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}")
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    try:
        ddp_steps_with_an_idle_expert(rank, world_size, device)
    finally:
        dist.destroy_process_group()


def test_ddp_over_nccl_needs_no_find_unused_parameters_and_every_rank_sees_a_zero_idle_gradient():
    """One rank per GPU, two at most; DDP without find_unused_parameters fails at the second step if a parameter
    got no gradient in the first, and each rank asserts its idle expert's gradient is exactly zero."""
    world_size = min(2, torch.cuda.device_count())
    mp.spawn(nccl_worker, args=(world_size, free_port()), nprocs=world_size)

"""What only a GPU shows: the record's GPU settings, the CUDA grouped GEMM in bf16, the compiled step with no host
sync, DDP over NCCL.

Skipped without CUDA; `python tools/gpu_check.py` runs them first on a GPU machine. Its plan counts this file's
compiles (4: the grouped GEMM twice, the 2-layer model, Newton-Schulz): a test that compiles more changes it.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist

from train_gpt2 import (GPT, Hyperparameters, balance_loss, expert_matmul, make_optimizers, setup_runtime,
                        zeropower_via_newtonschulz5)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

C, H = 768, 3072  # full width: the shapes the trainer runs


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


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
    """The CUTLASS grouped GEMM (sm90, bf16) against per-expert matmuls. Known grouped-GEMM paths need 16-byte
    aligned groups in some layouts (a device-side assert); the odd counts here show whether ours does."""
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
    assert y.dtype == torch.bfloat16 and relative_error(y, y_ref) < 1e-2
    assert relative_error(x.grad, x_ref.grad) < 1e-2
    for g, n in enumerate(counts):  # every expert's weight gradient, an empty expert's exactly zero
        if n == 0:
            assert torch.count_nonzero(w.grad[g]) == 0
        else:
            assert relative_error(w.grad[g], w_ref.grad[g]) < 1e-2, (g, n)


def starved_moe(**kw) -> Hyperparameters:
    return Hyperparameters(vocab_size=512, n_layer=2, n_head=6, n_embd=C, num_experts=4, **kw)


def starve(model: GPT, expert: int = 3):
    """The selection bias (as --router_bias_rate moves it) keeps one expert of every layer idle."""
    for block in model.transformer.h:
        block.mlp.router.bias[expert] = -10.0


def test_compiled_moe_train_step_matches_eager_and_has_no_host_sync():
    """The 2-layer MoE model compiled with fullgraph (no graph break in the MoE block) agrees with eager in bf16,
    gives an idle expert a zero gradient, and runs forward, backward and every optimizer step under sync debug
    mode 'error': any device-to-host copy (.item(), nonzero, a data-dependent shape) raises."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    args = Hyperparameters(vocab_size=512, n_layer=2, n_embd=C, num_experts=4, top_k=1, aux_loss_coef=0.01)
    model = GPT(args).cuda()
    starve(model)
    for block in model.transformer.h:
        torch.nn.init.normal_(block.mlp.c_proj, std=0.02)
    optimizers = make_optimizers(model, args, torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randint(0, 512, (8, 256), device="cuda")

    def step(run=compiled, optimize=True):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, stats = run(x, x)
            loss = loss + args.aux_loss_coef * balance_loss(stats["load"], stats["prob"])
        loss.backward()
        if optimize:
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
        return loss.detach(), stats

    eager_loss, _ = step(model, optimize=False)
    model.zero_grad(set_to_none=True)
    first, stats = step(optimize=False)  # compilation (and later the optimizers' lazy state) outside the check
    assert relative_error(first, eager_loss) < 1e-2 and stats["load"][:, 3].sum() == 0
    assert torch.count_nonzero(model.transformer.h[0].mlp.c_fc.grad[3]) == 0
    assert torch.count_nonzero(model.transformer.h[0].mlp.c_fc.grad[0]) > 0
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            last, _ = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(last) and last < first


def test_the_records_gpu_settings():
    """cuDNN attention with flash, memory-efficient and math disabled (recent torch tries flash first, so only
    this runs cuDNN), coordinate-descent tuning, and Newton-Schulz compiled as the record compiles it."""
    import torch._inductor.config as inductor_config
    rt = setup_runtime(Hyperparameters())
    assert rt.attention == "cudnn", rt.attention  # the probe ran cuDNN attention with nothing else enabled
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert not (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
                or torch.backends.cuda.math_sdp_enabled())
    assert rt.compile_model and inductor_config.coordinate_descent_tuning
    model = GPT(Hyperparameters(vocab_size=512, n_layer=1)).cuda()
    muon = make_optimizers(model, Hyperparameters(), rt.dtype, compile_ns=rt.compile_model)[2]
    assert muon.zeropower is not zeropower_via_newtonschulz5 and rt.dtype == torch.bfloat16
    G = torch.randn(3072, 768, device="cuda")
    compiled = muon.zeropower(G, steps=5, dtype=torch.bfloat16)
    assert relative_error(compiled, zeropower_via_newtonschulz5(G, steps=5, dtype=torch.bfloat16)) < 1e-2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_over_nccl_needs_no_find_unused_parameters_with_an_idle_expert():
    """DDP without find_unused_parameters fails at the second step if a parameter got no gradient in the first;
    an idle expert still gets a gradient (zeros) from the grouped GEMM."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        torch.manual_seed(0)
        args = Hyperparameters(vocab_size=512, n_layer=2, n_embd=C, num_experts=4, top_k=1, aux_loss_coef=0.01)
        model = GPT(args).cuda()
        starve(model)
        ddp = DDP(model, device_ids=[0])
        optimizers = make_optimizers(model, args, torch.bfloat16)
        x = torch.randint(0, 512, (4, 128), device="cuda")
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, stats = ddp(x, x)
            assert stats["load"][:, 3].sum() == 0
            (loss + 0.01 * balance_loss(stats["load"], stats["prob"])).backward()
            for opt in optimizers:
                opt.step()
            ddp.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)
    finally:
        dist.destroy_process_group()

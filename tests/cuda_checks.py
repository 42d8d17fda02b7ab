"""The checks of tests/test_cuda.py, written to run on any device, so that tests/test_cuda_checks.py can show on a
CPU that each one fails on a planted fault. Every tolerance is derived from a measured spread, not chosen:

- bf16 against fp32 for the same input. Five bf16 Newton-Schulz iterations on a 3072x768 matrix land 2.2% (in
  Frobenius norm) from fp32, and scaling the input by 1.001 moves the bf16 output by 1.9% (CPU, torch 2.13):
  bf16 rounding, amplified. A compiled (fused) kernel rounds differently, so it is held to its distance from
  fp32, at most twice the eager bf16 distance, never to eager bf16 itself. The MoE block's eager bf16 output
  is 0.5% from fp32; a planted fault (no scatter back to token order) is 138% away.
- A property of the result: Newton-Schulz's quintic maps a well-conditioned matrix's singular values into
  about [0.68, 1.15] in bf16 (fp32: [0.68, 1.13]); the check asks for [0.6, 1.25].
"""
import torch
import torch.nn.functional as F

from train_gpt2 import GPT, MoE, Hyperparameters, balance_loss, make_optimizers, zeropower_via_newtonschulz5

BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7
SINGULAR_VALUE_BAND = (0.6, 1.25)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


_REFERENCES = {}  # id(G): (G, its fp32 and eager bf16 results); G is kept, so its id names it alone


def newton_schulz_references(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager Newton-Schulz of G in fp32 and in bf16, computed once per G (bf16 matmuls are slow on a CPU)."""
    if id(G) not in _REFERENCES:
        _REFERENCES[id(G)] = (G, zeropower_via_newtonschulz5(G, steps=5, dtype=torch.float32),
                              zeropower_via_newtonschulz5(G, steps=5, dtype=torch.bfloat16))
    return _REFERENCES[id(G)][1:]


def check_newton_schulz(candidate, G: torch.Tensor) -> dict:
    """candidate(G, steps=5, dtype=bf16) (e.g. the compiled Newton-Schulz) against fp32 and eager bf16 on G."""
    fp32, eager = newton_schulz_references(G)
    out = candidate(G, steps=5, dtype=torch.bfloat16)
    spread, error = relative_error(eager, fp32), relative_error(out, fp32)
    values = torch.linalg.svdvals(out.float())
    assert out.dtype == torch.bfloat16, f"ran in {out.dtype}, not bf16"
    assert error <= 2 * spread, f"{error:.4f} from fp32, more than twice eager bf16's {spread:.4f}"
    low, high = SINGULAR_VALUE_BAND
    assert low <= values.min() and values.max() <= high, f"singular values in [{values.min():.3f}, {values.max():.3f}]"
    return dict(error=error, spread=spread)


def check_moe_block(candidate, moe: MoE, x: torch.Tensor, idx: torch.Tensor) -> dict:
    """candidate(x, idx) (e.g. the compiled block) under bf16 autocast, against the block in fp32 and eager bf16;
    x should be normalised like a block's input and moe.c_proj non-zero, so the output depends on every part."""
    device = x.device.type
    reference, _ = moe(x, idx)
    with torch.autocast(device, dtype=torch.bfloat16):
        eager, _ = moe(x, idx)
        out, _ = candidate(x, idx)
    spread, error = relative_error(eager, reference), relative_error(out, reference)
    assert error <= 2 * spread + BF16_EPS / 2, f"{error:.4f} from fp32, eager bf16 is {spread:.4f}"
    return dict(error=error, spread=spread)


def idle_expert_model(args: Hyperparameters, device, idle: int = 3) -> GPT:
    """The model with expert `idle` of every layer starved (the selection bias, as --router_bias_rate moves it)."""
    model = GPT(args).to(device)
    for block in model.transformer.h:
        block.mlp.router.bias[idle] = -10.0
    return model


def ddp_steps_with_an_idle_expert(rank: int, world_size: int, device: torch.device, steps: int = 3, idle: int = 3,
                                  fault_on_rank: int | None = None) -> None:
    """Inside an initialised process group: DDP without find_unused_parameters, an expert idle on every rank.
    Each step asserts on this rank that the idle expert saw no token and that its weights' gradients (after
    DDP's all-reduce) are exactly zero, and that a busy expert's are not; DDP itself fails at the second step
    if a parameter got no gradient at all. fault_on_rank plants a fault: that rank's backward leaves a small
    gradient on the idle expert, as a grouped GEMM that wrote into an empty group would."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    args = Hyperparameters(vocab_size=512, n_layer=2, n_head=2, n_embd=64, num_experts=4, top_k=1, aux_loss_coef=0.01)
    model = idle_expert_model(args, device, idle)
    if fault_on_rank == rank:
        stray = torch.zeros_like(model.transformer.h[0].mlp.c_fc)
        stray[idle] = 1e-6
        model.transformer.h[0].mlp.c_fc.register_hook(lambda grad: grad + stray)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizers = make_optimizers(model, args, torch.bfloat16 if device.type == "cuda" else torch.float32)
    x = torch.randint(0, 512, (4, 64), device=device, generator=torch.Generator(device).manual_seed(rank))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for step in range(steps):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, stats = ddp(x, x)
        (loss + args.aux_loss_coef * balance_loss(stats["load"], stats["prob"])).backward()
        for layer, block in enumerate(model.transformer.h):
            assert stats["load"][layer, idle] == 0, f"rank {rank} step {step}: the idle expert got tokens"
            for name in ("c_fc", "c_proj"):
                grad = getattr(block.mlp, name).grad
                assert torch.count_nonzero(grad[idle]) == 0, \
                    f"rank {rank} step {step} layer {layer}: the idle expert's {name} gradient is not zero"
            # the head and c_proj start at zero, so the blocks get no gradient at step 0 and c_fc none at step 1:
            # from step 1 on, the busy expert's c_proj shows that the gradient flows
            assert step == 0 or torch.count_nonzero(block.mlp.c_proj.grad[0]) > 0, f"rank {rank} step {step}: no gradient"
        for opt in optimizers:
            opt.step()
        ddp.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)


def normalised_tokens(n_embd: int, device, batch: int = 8, length: int = 256, vocab: int = 512):
    gen = torch.Generator(device).manual_seed(0)
    x = F.rms_norm(torch.randn(batch, length, n_embd, device=device, generator=gen), (n_embd,))
    return x, torch.randint(0, vocab, (batch, length), device=device, generator=gen)

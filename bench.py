"""
Benchmark the MoE against the dense model on whatever device this finds: the MLP layer alone, the whole
train step, the optimizer step, and the compiled graph's health (graph breaks, recompiles, host syncs).

    python bench.py                          # CPU: small sizes, eager float32 timings; CUDA: full size, compiled bf16
    python bench.py --size full --device_batch_size 32
    python bench.py --json bench.json --peak_tflops 989

It prints a markdown table with the MoE/dense ratios and writes the same figures as JSON. The MoE wins in
wall-clock only if its train step costs less than 1.125x the dense one (it needs ~4000 steps to the dense
model's ~4500); our target is 1.05x.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch

from train_gpt2 import GPT, MLP, GPTConfig, Hyperparameters, MoE, balance_loss, make_optimizers

SIZES = {  # model and batch per device
    "full": dict(vocab_size=50304, n_layer=12, n_head=6, n_embd=768, sequence_length=1024, device_batch_size=64),
    "small": dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=256, sequence_length=256, device_batch_size=8),
}
# dense bf16 tensor-core peaks (TFLOP/s), for MFU; --peak_tflops for anything else
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("B200", 2250.0),
               ("A100", 312.0)]


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM's count): 6 x the matmul parameters a token uses, plus attention's
    12 x layers x width x sequence length. The MoE's active parameters are top_k experts, the shared expert
    and the router: an MLP of width top_k x expert_hidden + shared_expert_hidden, plus C x E."""
    C, L = config.n_embd, config.n_layer
    moe = config.num_experts > 1
    mlp = 2 * C * ((config.top_k if moe else 1) * config.expert_width + config.shared_expert_hidden)
    router = C * config.num_experts if moe and config.router == "learned" else 0
    active = L * (4 * C * C + mlp + router) + config.vocab_size * C
    return 6 * active + 12 * L * C * seq_len


class Timer:
    """Median wall time of a callable, synchronising the device around each call."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, fn, warmup: int, steps: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(steps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)


def count_graph_health(fn, warmup_calls: int, more_calls: int) -> dict:
    """Graph breaks in the first compiled calls, and recompiles in later ones (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters
    counters.clear()
    for _ in range(warmup_calls):
        fn()
    breaks = sum(counters["graph_break"].values())
    frames = counters["frames"]["total"]
    for _ in range(more_calls):
        fn()
    return dict(graph_breaks=breaks, recompiles=counters["frames"]["total"] - frames,
                graphs=counters["stats"]["unique_graphs"],
                break_reasons=sorted(counters["graph_break"])[:5])


def count_host_syncs(fn) -> int | None:
    """Host-device synchronisations in one call (CUDA only): torch warns once per sync in 'warn' mode."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


class Setup:
    """One model (dense or MoE) with its optimizers, batch and autocast, as train_gpt2.py builds them."""

    def __init__(self, args, num_experts: int, device: torch.device, compile_model: bool):
        hyper = Hyperparameters(**{k: v for k, v in SIZES[args.size].items() if k != "device_batch_size"},
                                **moe_fields(args, num_experts), aux_loss_coef=0.01 if num_experts > 1 else 0.0)
        self.config = GPTConfig.from_args(hyper)
        self.device, self.args = device, args
        torch.manual_seed(0)
        self.model = GPT(self.config).to(device)
        self.dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        self.optimizers = make_optimizers(self.model, hyper, self.dtype)
        self.compiled = torch.compile(self.model) if compile_model else self.model
        self.autocast = torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        B, T = args.device_batch_size, hyper.sequence_length
        self.tokens = B * T
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, self.config.vocab_size, (B, T), generator=gen).to(device)
        self.y = torch.randint(0, self.config.vocab_size, (B, T), generator=gen).to(device)
        self.aux = hyper.aux_loss_coef

    def forward_backward(self):
        with self.autocast:
            loss, stats = self.compiled(self.x, self.y)
        if self.aux:
            loss = loss + self.aux * balance_loss(stats["load"], stats["prob"])
        loss.backward()

    def optimizer_step(self):
        for opt in self.optimizers:
            opt.step()

    def train_step(self):
        self.forward_backward()
        self.optimizer_step()
        self.model.zero_grad(set_to_none=True)


def moe_fields(args, num_experts: int) -> dict:
    """The MoE's settings from the command line; the dense model (num_experts 1) keeps the record's MLP."""
    if num_experts == 1:
        return dict(num_experts=1)
    return dict(num_experts=num_experts, top_k=args.top_k, expert_hidden=args.expert_hidden,
                shared_expert_hidden=args.shared_expert_hidden)


def bench_layer(args, num_experts: int, device: torch.device, timer: Timer) -> float:
    """Forward and backward of one MLP layer (dense) or MoE layer at the model's shapes, on normalised input."""
    size = SIZES[args.size]
    config = GPTConfig(n_embd=size["n_embd"], **moe_fields(args, num_experts))
    torch.manual_seed(0)
    layer = (MLP(config) if num_experts == 1 else MoE(config)).to(device)
    torch.nn.init.normal_(layer.c_proj.weight if num_experts == 1 else layer.c_proj, std=0.02)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    x = torch.randn(args.device_batch_size, size["sequence_length"], config.n_embd, device=device, requires_grad=True)
    idx = torch.randint(0, 50257, x.shape[:2], device=device)
    run = torch.compile(layer) if args.compile else layer

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = run(x, idx)[0] if num_experts > 1 else run(x)
        y.float().square().mean().backward()
    return timer(step, args.warmup, args.steps)


def main(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full" if cuda else "small")
    parser.add_argument("--device_batch_size", type=int, help="sequences per step (default: the size's)")
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=1)
    parser.add_argument("--expert_hidden", type=int, help="each routed expert's hidden width (default: 4 x width)")
    parser.add_argument("--shared_expert_hidden", type=int, default=0, help="the shared expert's width (0: none)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16" if cuda else "float32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda,
                        help="time the compiled model (default: on with CUDA)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (the median is reported)")
    parser.add_argument("--health", action=argparse.BooleanOptionalAction, default=True,
                        help="count graph breaks and recompiles of the compiled model (compiles in bf16)")
    parser.add_argument("--peak_tflops", type=float, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--json", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.device_batch_size is None:
        args.device_batch_size = SIZES[args.size]["device_batch_size"]
    if args.num_experts < 2 or not 1 <= args.top_k <= args.num_experts:
        parser.error(f"--num_experts {args.num_experts} / --top_k {args.top_k}: need 2 or more experts and "
                     f"1 <= top_k <= num_experts")
    if (args.expert_hidden is not None and args.expert_hidden <= 0) or args.shared_expert_hidden < 0:
        parser.error("--expert_hidden must be positive and --shared_expert_hidden >= 0")
    device = torch.device("cuda" if cuda else "cpu")
    timer = Timer(device)
    peak = args.peak_tflops or device_peak_tflops(device)
    device_name = torch.cuda.get_device_name(device) if cuda else cpu_name()
    print(f"device: {device_name} ({os.cpu_count()} CPUs), torch {torch.__version__}, size {args.size}, "
          f"{args.dtype}, {'compiled' if args.compile else 'eager'}, {args.device_batch_size} x "
          f"{SIZES[args.size]['sequence_length']} tokens per step", flush=True)

    results = {}
    for mode, experts in (("dense", 1), ("moe", args.num_experts)):
        r = results[mode] = {}
        r["layer_ms"] = bench_layer(args, experts, device, timer)
        setup = Setup(args, experts, device, args.compile)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        r["step_ms"] = timer(setup.train_step, args.warmup, args.steps)
        r["tokens_per_s"] = setup.tokens / (r["step_ms"] / 1000)
        r["flops_per_token"] = flops_per_token(setup.config, SIZES[args.size]["sequence_length"])
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e12) if peak else None
        r["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
        setup.forward_backward()
        r["optimizer_ms"] = timer(setup.optimizer_step, 1, max(3, args.steps // 3))
        setup.model.zero_grad(set_to_none=True)
        r["host_syncs_per_step"] = count_host_syncs(setup.train_step)
        if args.health:
            torch._dynamo.reset()
            health_args = argparse.Namespace(**{**vars(args), "dtype": "bfloat16"})
            compiled = Setup(health_args, experts, device, compile_model=True)
            r.update(count_graph_health(compiled.train_step, warmup_calls=2, more_calls=3))
        r["params"] = sum(p.numel() for p in setup.model.parameters())
        print(f"{mode}: done", flush=True)
        del setup

    def ratio(key):
        d, m = results["dense"].get(key), results["moe"].get(key)
        return m / d if d and m is not None else None

    rows = [("MLP layer fwd+bwd (ms)", "layer_ms", ".2f"), ("train step (ms, median)", "step_ms", ".2f"),
            ("tokens/s", "tokens_per_s", ",.0f"), ("MFU", "mfu", ".1%"), ("peak memory (MiB)", "peak_memory_mib", ",.0f"),
            ("optimizer step (ms)", "optimizer_ms", ".2f"), ("parameters", "params", ",d"),
            ("graph breaks", "graph_breaks", "d"), ("recompiles", "recompiles", "d"),
            ("host syncs per step", "host_syncs_per_step", "d")]

    def cell(v, spec):
        return "-" if v is None else format(v, spec)
    shape = (f", H={args.expert_hidden}" if args.expert_hidden else "") + (
        f", shared {args.shared_expert_hidden}" if args.shared_expert_hidden else "")
    print(f"\n| measure | dense | MoE (E={args.num_experts}, top-{args.top_k}{shape}) | MoE/dense |\n|---|---|---|---|")
    for label, key, spec in rows:
        print(f"| {label} | {cell(results['dense'].get(key), spec)} | {cell(results['moe'].get(key), spec)} | "
              f"{cell(ratio(key), '.3f') if key not in ('graph_breaks', 'recompiles', 'host_syncs_per_step') else ''} |")
    step_ratio = ratio("step_ms")
    print(f"\nMoE/dense train step: {step_ratio:.3f}x (wins in wall-clock below 1.125x; target 1.05x)")
    if args.json:
        meta = dict(device=device_name, torch=torch.__version__, command=" ".join(["python", *sys.argv]),
                    size=args.size, dtype=args.dtype, compile=args.compile, device_batch_size=args.device_batch_size,
                    num_experts=args.num_experts, top_k=args.top_k, expert_hidden=args.expert_hidden,
                    shared_expert_hidden=args.shared_expert_hidden,
                    sequence_length=SIZES[args.size]["sequence_length"], peak_tflops=peak)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results, ratios={k: ratio(k) for _, k, _ in rows}), f, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()

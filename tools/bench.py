"""
Benchmark the MoE against the dense model with the trainer's own pieces: its flags and Hyperparameters, its
model, optimizers, runtime (precision, compile, attention backend) and train_step. On whatever device this
finds it times the whole train step, the optimizer step alone and (optionally) the MLP layer alone, and
counts graph breaks, recompiles and host syncs of the compiled step.

    python tools/bench.py                          # CPU: --size tiny, eager float32; CUDA: the trainer's full size, compiled bf16
    python tools/bench.py --device_batch_size 32   # any trainer flag: it sets the MoE (default: the seed's, as run_moe.sh)
    python tools/bench.py --num_experts 16 --top_k 4 --expert_hidden 768 --json bench.json --peak_tflops 989
    python tools/bench.py --size full --loader 'data/fineweb10B/fineweb_train_*.bin'  # the data loader alone

The dense model is the MoE's flags with a dense MLP; `--extra_moe "FLAGS"` (repeatable) times more MoE designs
beside it. It prints a markdown table with each MoE/dense ratio and writes the same figures as JSON, each
model's compiled figures as soon as they are measured. The ratio is given three ways: the whole step; forward
and backward alone; and a projection for 8 ranks (forward and backward, Adam, and Muon's one-rank time times
the share of the Newton-Schulz FLOPs that the busiest of 8 ranks owns; the all-reduces of the gradients and of
Muon's updates are left out, as on a single GPU). The MoE wins in wall-clock only if its train step costs less
than 1.125x the dense one (it needs ~4000 steps to the dense model's ~4500); our target is 1.05x.
"""
import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time
import warnings

import torch

from compare import fmt, markdown
from repo_root import ROOT
from train_gpt2 import (GPT, MLP, DistributedDataLoader, Hyperparameters, MoE, Muon, ROUTERS,
                        TrainClock, TrainState, balance_by_cost, build_parser, check_args, cpu_model, make_optimizers,
                        newton_schulz_flops, objective, setup_runtime, train_step)

# the MoE when no flag says otherwise (run_moe.sh's), and the sizes: full is the trainer's defaults, tiny the CPU
# size of flags/tiny.txt; flags given on the command line win
SEED_MOE_FLAGS = str(ROOT / "flags" / "seed_moe.txt")
SIZE_FLAGS = dict(full=[], tiny=["@" + str(ROOT / "flags" / "tiny.txt")])
# dense bf16 tensor-core peaks (TFLOP/s), for MFU; --peak_tflops for anything else
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("B200", 2250.0),
               ("A100", 312.0)]


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def flops_per_token(config: Hyperparameters, seq_len: int) -> float:
    """Training FLOPs per token (PaLM's count): 6 x the matmul parameters a token uses, plus attention's
    12 x layers x width x sequence length. The MoE's active parameters are top_k experts, the shared expert
    and the router's parameters: an MLP of width top_k x expert_hidden + shared_expert_hidden, plus the router."""
    C, L = config.n_embd, config.n_layer
    moe = config.num_experts > 1
    mlp = 2 * C * ((config.top_k if moe else 1) * config.mlp_hidden + config.shared_expert_hidden)
    with torch.device("meta"):
        router = sum(p.numel() for p in ROUTERS[config.router](config).parameters()) if moe else 0
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


class GraphHealth:
    """Graph breaks and recompiles of compiled code, from torch._dynamo's counters: breaks while a block runs
    first (compilation), recompiles in later blocks (the timed steps should need none)."""

    def __init__(self):
        from torch._dynamo.utils import counters
        self.counters = counters
        counters.clear()

    def first_calls_done(self):
        self.breaks = sum(self.counters["graph_break"].values())
        self.frames = self.counters["frames"]["total"]

    def result(self) -> dict:
        return dict(graph_breaks=self.breaks, recompiles=self.counters["frames"]["total"] - self.frames,
                    graphs=self.counters["stats"]["unique_graphs"], break_reasons=sorted(self.counters["graph_break"])[:5])


def count_graph_health(fn, warmup_calls: int, more_calls: int) -> dict:
    """GraphHealth of fn called warmup_calls times, then more_calls times."""
    health = GraphHealth()
    for _ in range(warmup_calls):
        fn()
    health.first_calls_done()
    for _ in range(more_calls):
        fn()
    return health.result()


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


class FixedBatch:
    """The train loader's interface over one fixed batch of random tokens."""

    def __init__(self, args: Hyperparameters, device: torch.device):
        gen = torch.Generator().manual_seed(1)
        shape = (args.device_batch_size, args.sequence_length)
        self.x = torch.randint(0, args.vocab_size, shape, generator=gen).to(device)
        self.y = torch.randint(0, args.vocab_size, shape, generator=gen).to(device)

    def next_batch(self):
        return self.x, self.y


def bench_model(args: Hyperparameters, rt, bench_args, timer: Timer) -> dict:
    """The trainer's train_step (one micro-batch) and optimizer step on one model; the figures as a dict."""
    torch.manual_seed(0)
    model = GPT(args).to(rt.device)
    optimizers = make_optimizers(model, args, rt.dtype, compile_ns=rt.compile_model)
    wrapped = torch.compile(model) if rt.compile_model else model  # one process: no DDP
    state = TrainState(model, optimizers, FixedBatch(args, rt.device), TrainClock())
    health = GraphHealth() if rt.compile_model else None

    def step():
        train_step(wrapped, state, 1.0, args, rt)

    if rt.cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(bench_args.warmup):  # compilation happens here
        step()
    if health:
        health.first_calls_done()
    r = dict(step_ms=timer(step, 0, bench_args.steps))
    r.update(health.result() if health else {})
    r["tokens_per_s"] = args.device_batch_size * args.sequence_length / (r["step_ms"] / 1000)
    r["flops_per_token"] = flops_per_token(model.config, args.sequence_length)
    r["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20 if rt.cuda else None
    r["host_syncs_per_step"] = count_host_syncs(step)

    def forward_backward():  # the compiled graph of the step, without the optimizers
        with rt.autocast():
            loss, stats = wrapped(state.train_loader.x, state.train_loader.y)
        objective(loss, stats, stats.get("load"), args).backward()

    r["fwd_bwd_ms"] = timer(lambda: (forward_backward(), model.zero_grad(set_to_none=True)), 1, bench_args.steps)
    forward_backward()  # the optimizers alone, on these gradients
    muon = next(opt for opt in optimizers if isinstance(opt, Muon))
    r["optimizer_ms"] = timer(lambda: [opt.step() for opt in optimizers], 1, max(3, bench_args.steps // 3))
    r["muon_ms"] = timer(muon.step, 0, max(3, bench_args.steps // 3))
    r["adam_ms"] = timer(lambda: [opt.step() for opt in optimizers if opt is not muon], 0, max(3, bench_args.steps // 3))
    r["ns_share_8_ranks"] = newton_schulz_share(muon, 8)
    r["projected_8_rank_ms"] = r["fwd_bwd_ms"] + r["adam_ms"] + r["muon_ms"] * r["ns_share_8_ranks"]
    r["params"] = sum(p.numel() for p in model.parameters())
    return r


def newton_schulz_share(muon: Muon, ranks: int) -> float:
    """The share of Muon's Newton-Schulz FLOPs that the busiest rank owns among `ranks` (the trainer's split)."""
    params = [p for group in muon.param_groups for p in group["params"]]
    costs = [newton_schulz_flops(p.shape) for p in params]
    owners = balance_by_cost(costs, ranks)
    return max(sum(c for c, o in zip(costs, owners) if o == r) for r in range(ranks)) / sum(costs)


def eager_peak_memory(args: Hyperparameters, rt, batch: int) -> float | None:
    """Peak memory (MiB) of one eager train step at this device batch: model, optimizer state, activations."""
    if not rt.cuda:
        return None
    args = dataclasses.replace(args, device_batch_size=batch, batch_size=batch)
    torch.manual_seed(0)
    model = GPT(args).to(rt.device)
    state = TrainState(model, make_optimizers(model, args, rt.dtype), FixedBatch(args, rt.device), TrainClock())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        train_step(model, state, 1.0, args, rt)
        return torch.cuda.max_memory_allocated() / 2 ** 20
    except torch.cuda.OutOfMemoryError:
        return float("inf")
    finally:
        del model, state
        torch.cuda.empty_cache()


def bench_layer(args: Hyperparameters, rt, bench_args, timer: Timer) -> float:
    """Forward and backward of one MLP layer (dense) or MoE layer at the model's shapes, on normalised input."""
    config = args
    torch.manual_seed(0)
    layer = (MLP(config) if config.num_experts == 1 else MoE(config)).to(rt.device)
    torch.nn.init.normal_(layer.c_proj.weight if config.num_experts == 1 else layer.c_proj, std=0.02)
    x = torch.randn(args.device_batch_size, args.sequence_length, config.n_embd, device=rt.device, requires_grad=True)
    idx = torch.randint(0, args.vocab_size, x.shape[:2], device=rt.device)
    run = torch.compile(layer) if rt.compile_model else layer

    def step():
        with rt.autocast():
            y = run(x, idx)[0]
        y.float().square().mean().backward()
    return timer(step, bench_args.warmup, bench_args.steps)


def bench_loader(args: Hyperparameters, pattern: str, ranks: int, steps: int) -> dict:
    """Rank 0's next_batch at the trainer's B and T among `ranks` ranks, in the record's order and in a sampled
    one (data seed 1): the first call (which draws a sampled order) and the median of the next `steps`, in ms.
    Shards just read or written sit in the page cache; a cold first pass reads each sequence from disk."""
    figures = {}
    for order, data_seed in (("record", 0), ("sampled", 1)):
        loader = DistributedDataLoader(pattern, args.device_batch_size, args.sequence_length, 0, ranks,
                                       data_seed=data_seed)
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            loader.next_batch()
            times.append(1000 * (time.perf_counter() - t0))
        figures[order] = dict(first_ms=times[0], batch_ms=statistics.median(times[1:]),
                              sequences=int(loader.first_sequence[-1]))
    return figures


def parse(argv=None) -> tuple[argparse.Namespace, Hyperparameters]:
    """The benchmark's own flags, then the trainer's (with the seed's MoE and --size as their defaults)."""
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Every other flag is the trainer's (python train_gpt2.py --help).")
    parser.add_argument("--size", choices=list(SIZE_FLAGS), default="full" if cuda else "tiny",
                        help="full: the trainer's defaults (the record's model and per-GPU batch); tiny: "
                        "flags/tiny.txt, a CPU size")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens there)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (the median is reported)")
    parser.add_argument("--layer", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the MLP layer alone, dense vs MoE (two more compiles when compiled)")
    parser.add_argument("--peak_tflops", type=float, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--memory_batches", default="", help="comma-separated device batch sizes at which to "
                        "measure each model's peak memory in one eager train step (CUDA; an upper bound of the "
                        "compiled step's), e.g. 64,32")
    parser.add_argument("--json", help="write the figures here as JSON")
    parser.add_argument("--extra_moe", action="append", default=[], metavar="FLAGS",
                        help="another MoE design to time beside the first, as trainer flags over the others "
                        "(quoted; repeatable), e.g. \"--num_experts 16 --top_k 3 --expert_hidden 768 "
                        "--shared_expert_hidden 768\"")
    parser.add_argument("--loader", metavar="GLOB", help="time the data loader alone on these shards, rank 0 of "
                        "--loader_ranks, in the record's order and a sampled one, and exit")
    parser.add_argument("--loader_ranks", type=int, default=8, help="ranks for --loader (default 8)")
    bench_args, rest = parser.parse_known_args(argv)
    trainer, defaults = build_parser(), ["@" + SEED_MOE_FLAGS, *SIZE_FLAGS[bench_args.size]]
    designs = []
    for flags in [rest, *(rest + shlex.split(extra) for extra in bench_args.extra_moe)]:
        try:
            args = Hyperparameters(**vars(trainer.parse_args(defaults + flags)))
        except SystemExit:
            parser.print_usage(sys.stderr)
            raise
        # one micro-batch per step; no validation
        args = dataclasses.replace(args, batch_size=args.device_batch_size,
                                   val_tokens=args.device_batch_size * args.sequence_length)
        if args.num_experts < 2:
            parser.error(f"--num_experts {args.num_experts}: the benchmark compares an MoE (2 or more experts) "
                         f"with dense")
        try:
            check_args(args, world_size=1)
        except ValueError as e:
            parser.error(str(e))
        designs.append(args)
    bench_args.designs = designs[1:]
    return bench_args, designs[0]


def dense_counterpart(args: Hyperparameters) -> Hyperparameters:
    """The same flags with the record's dense MLP (router flags are ignored by a dense model)."""
    return dataclasses.replace(args, num_experts=1, top_k=1, expert_hidden=None, shared_expert_hidden=0)


def main(argv=None):
    bench_args, moe_args = parse(argv)
    if bench_args.loader:
        figures = bench_loader(moe_args, bench_args.loader, bench_args.loader_ranks, bench_args.steps)
        print(f"data loader, rank 0 of {bench_args.loader_ranks}, {moe_args.device_batch_size} x "
              f"{moe_args.sequence_length} tokens a batch, {cpu_model()}:")
        for order, f in figures.items():
            print(f"{order}: first batch {f['first_ms']:.2f} ms, then {f['batch_ms']:.3f} ms a batch (median of "
                  f"{bench_args.steps})" + (f"; {f['sequences']:,} sequences in the corpus" if order == "sampled" else ""))
        return figures
    rt = setup_runtime(moe_args)
    timer = Timer(rt.device)
    peak = bench_args.peak_tflops or device_peak_tflops(rt.device)
    device_name = torch.cuda.get_device_name(rt.device) if rt.cuda else cpu_model()
    print(f"device: {device_name} ({os.cpu_count()} CPUs), torch {torch.__version__}, size {bench_args.size}, "
          f"{str(rt.dtype)[6:]}, {'compiled' if rt.compile_model else 'eager'}, attention {rt.attention}, "
          f"{moe_args.device_batch_size} x {moe_args.sequence_length} tokens per step", flush=True)

    results = {}
    models = [("dense", dense_counterpart(moe_args)), ("moe", moe_args),
              *((design_label(args), args) for args in bench_args.designs)]
    for mode, args in models:
        def save():  # the figures so far survive a later failure, or a later probe that runs out of memory
            if bench_args.json:
                write_json(bench_args, moe_args, rt, device_name, peak, results, [m for m, _ in models])
        r = results[mode] = bench_model(args, rt, bench_args, timer)
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e12) if peak else None
        save()
        print(f"{mode}: train step {r['step_ms']:.2f} ms, forward+backward {r['fwd_bwd_ms']:.2f} ms, optimizers "
              f"{r['optimizer_ms']:.2f} ms (Muon {r['muon_ms']:.2f}), 8-rank projection {r['projected_8_rank_ms']:.2f} ms",
              flush=True)
        if bench_args.layer:
            r["layer_ms"] = bench_layer(args, rt, bench_args, timer)
            save()
        for batch in filter(None, bench_args.memory_batches.split(",")):
            r[f"peak_memory_mib_eager_b{batch}"] = eager_peak_memory(args, rt, int(batch))
            save()

    print("\n" + table(results, moe_args) + "\n")
    for mode, ratio in ratios(results).items():
        print(f"{mode}/dense: train step {fmt(ratio['step_ms'], '.3f')}x, forward+backward "
              f"{fmt(ratio['fwd_bwd_ms'], '.3f')}x, 8-rank projection {fmt(ratio['projected_8_rank_ms'], '.3f')}x "
              f"(the MoE wins in wall-clock below 1.125x; target 1.05x)")
    if bench_args.json:
        print(f"wrote {bench_args.json}")
    return results


ROWS = [("MLP layer fwd+bwd (ms)", "layer_ms", ".2f"), ("train step (ms, median)", "step_ms", ".2f"),
        ("forward+backward (ms)", "fwd_bwd_ms", ".2f"), ("optimizer step (ms)", "optimizer_ms", ".2f"),
        ("Muon step (ms)", "muon_ms", ".2f"), ("Adam steps (ms)", "adam_ms", ".2f"),
        ("busiest of 8 ranks' Newton-Schulz share", "ns_share_8_ranks", ".3f"),
        ("projected 8-rank step (ms)", "projected_8_rank_ms", ".2f"),
        ("tokens/s", "tokens_per_s", ",.0f"), ("MFU", "mfu", ".1%"), ("peak memory (MiB)", "peak_memory_mib", ",.0f"),
        ("parameters", "params", ",d"), ("graph breaks", "graph_breaks", "d"), ("recompiles", "recompiles", "d"),
        ("host syncs per step", "host_syncs_per_step", "d")]
UNRATIOED = {"graph_breaks", "recompiles", "host_syncs_per_step", "ns_share_8_ranks"}


def design_label(args) -> str:
    """A short name of an MoE design, e.g. 'E16 top-3 H768 S768' (args: Hyperparameters or the JSON's meta)."""
    get = args.get if isinstance(args, dict) else lambda k: getattr(args, k)
    return (f"E{get('num_experts')} top-{get('top_k')}" + (f" H{get('expert_hidden')}" if get("expert_hidden") else "")
            + (f" S{get('shared_expert_hidden')}" if get("shared_expert_hidden") else ""))


def rows(results: dict) -> list[tuple[str, str, str]]:
    """ROWS, and a row for each eager peak-memory batch measured."""
    batches = sorted({k for r in results.values() for k in r if k.startswith("peak_memory_mib_eager_b")},
                     key=lambda k: -int(k.rsplit("b", 1)[1]))
    return ROWS + [(f"peak memory, eager step at batch {k.rsplit('b', 1)[1]} (MiB)", k, ",.0f") for k in batches]


def ratios(results: dict) -> dict:
    """{MoE model: {row: its figure / dense's}} for every row that both have."""
    dense = results.get("dense", {})
    return {mode: {key: (r[key] / dense[key] if dense.get(key) and r.get(key) is not None and key not in UNRATIOED
                         else None) for _, key, _ in rows(results)}
            for mode, r in results.items() if mode != "dense"}


def table(results: dict, meta) -> str:
    """The markdown table of the figures (meta: the first MoE's Hyperparameters, or the JSON's meta)."""
    models = meta.get("models", list(results)) if isinstance(meta, dict) else list(results)
    moes = [m for m in models if m != "dense"]
    name = {m: f"MoE ({design_label(meta)})" if m == "moe" else m for m in moes}
    ratio = ratios(results)
    return markdown(["measure", "dense", *(name[m] for m in moes), *(f"{name[m]}/dense" for m in moes)],
                    [[label, *(fmt(results.get(m, {}).get(key), spec) for m in ["dense", *moes]),
                      *(fmt(ratio.get(m, {}).get(key), ".3f") for m in moes)] for label, key, spec in rows(results)])


def write_json(bench_args, args: Hyperparameters, rt, device_name: str, peak, results: dict, models: list[str]):
    """The figures with what produced them; complete=False until every model's compiled figures are in."""
    import torch._inductor.config as inductor_config
    meta = dict(device=device_name, torch=torch.__version__, command=" ".join(["python", *sys.argv]),
                size=bench_args.size, dtype=str(rt.dtype)[6:], compile=rt.compile_model, attention=rt.attention,
                device_batch_size=args.device_batch_size, sequence_length=args.sequence_length,
                num_experts=args.num_experts, top_k=args.top_k, expert_hidden=args.expert_hidden,
                shared_expert_hidden=args.shared_expert_hidden, router=args.router, peak_tflops=peak,
                coordinate_descent_tuning=bool(rt.compile_model and inductor_config.coordinate_descent_tuning),
                models=models, complete=all(m in results for m in models))
    tmp = f"{bench_args.json}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(meta=meta, results=results, ratios=ratios(results)), f, indent=2)
    os.replace(tmp, bench_args.json)


if __name__ == "__main__":
    main()

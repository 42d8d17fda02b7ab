"""The tables and the trend of this folder's study (its README says what is computed and why).

    python records/2026-12-07_HorizonCPU/analyze.py [--plot trend.png] [--json results.json]

Reads every finished run: horizon 500 from ../2026-12-07_DataOrderCPU (per_token: dense and MoE at 500;
equal_time: dense at 625), the rest from runs/<side>_L<steps>_s<pair>/. Prints the table per horizon, the growth
test and the fitted line; --json writes them. Needs scipy; matplotlib for --plot.
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_ORDER = HERE.parent / "2026-12-07_DataOrderCPU"
TOKENS_PER_STEP = 16 * 256
SPEEDRUN_TOKENS = 4578 * 8 * 64 * 1024  # the record: 4578 steps of 8 x 64 x 1024 tokens, 2.4B
# the record's tokens per non-embedding parameter (12 layers of 12 x 768^2, 28 a parameter) at this size (4 x 128)
SAME_TOKENS_PER_PARAM = SPEEDRUN_TOKENS * (4 * 12 * 128 ** 2) / (12 * 12 * 768 ** 2)
HORIZONS = [500, 1000, 2000]
GROWTH_PAIRS = [11, 12, 13, 14]
CPU_BENCH = HERE.parent / "2026-11-30_MoEvsTunedDenseCPU" / "bench_R.json"  # this size's MoE/dense step on a CPU
# published GPU step ratios of an MoE to dense at equal active FLOPs (the README of the repository's REFERENCE, 8)
GPU_STEP_RATIOS = [("nanochat d18, 8 experts top-2 + shared, 8xH100", 1.31),
                   ("OLMoE 64 experts top-8, MegaBlocks, H100", 1.59), ("JAX d2560, 64 experts top-4, 8xH100", 1.65)]


def final_val(log: Path, steps: int) -> float | None:
    """The val loss a log reports at its last step, or None if the run did not finish."""
    found = re.findall(rf"^step:{steps}/{steps} val_loss:(\S+) ", log.read_text(), flags=re.M)
    return float(found[-1]) if found else None


def flag(flags: list[str], name: str) -> str:
    return flags[len(flags) - 1 - flags[::-1].index(name) + 1]  # the last occurrence wins, as in argparse


def losses() -> dict:
    """{(side, steps, pair): final val loss} of every finished run."""
    found = {}
    for folder in ("per_token", "equal_time"):
        manifest = DATA_ORDER / folder / "ab.json"
        for e in json.loads(manifest.read_text())["runs"] if manifest.exists() else []:
            side = "moe" if "--num_experts" in e["flags"] else "dense"
            steps = int(flag(e["flags"], "--num_iterations"))
            loss = final_val(DATA_ORDER / folder / e["log"], steps) if e["status"] == 0 else None
            if loss is not None:
                found[side, steps, e["seed"]] = loss
    for run in sorted((HERE / "runs").glob("*_L*_s*")):
        side, steps, pair = re.fullmatch(r"(dense|moe)_L(\d+)_s(\d+)", run.name).groups()
        for log in run.glob("*.txt"):
            loss = final_val(log, int(steps))
            if loss is not None:
                key = (side, int(steps), int(pair))
                if key in found and found[key] != loss:  # a branch must reproduce the run from scratch
                    print(f"mismatch: {key} {found[key]} (DataOrderCPU) against {loss} ({log})", file=sys.stderr)
                found[key] = loss
    return found


def dense_step_equivalent(moe: float, dense: dict[int, float]) -> tuple[float, bool]:
    """(D, censored): the dense steps that match the MoE's loss, linear in log(steps) between the two dense
    lengths that bracket it; below dense's longest run, censored at that length."""
    lengths = sorted(dense)
    if moe < dense[lengths[-1]]:
        return float(lengths[-1]), True
    # the bracketing lengths; a MoE worse than dense's shortest run extrapolates below it from the first two
    a, b = next(((a, b) for a, b in zip(lengths, lengths[1:]) if dense[b] <= moe <= dense[a]), lengths[:2])
    t = (dense[a] - moe) / (dense[a] - dense[b])
    return math.exp(math.log(a) + t * (math.log(b) - math.log(a))), False


def mean_interval(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, std, lower, upper) with the 95% t-interval of the mean."""
    from scipy import stats
    n, mean = len(values), sum(values) / len(values)
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot", help="write the trend to this PNG (needs matplotlib)")
    parser.add_argument("--json", help="write the per-pair figures, the table, the test and the fit to this file")
    args = parser.parse_args(argv)
    from scipy import stats
    found = losses()
    results = dict(horizons={}, pairs={})
    rows = []
    for N in HORIZONS:
        pairs = sorted({p for side, steps, p in found if side == "moe" and steps == N})
        per_pair = {}
        for p in pairs:
            dense = {L: found[("dense", L, p)] for L in (N, N * 5 // 4, N * 3 // 2) if ("dense", L, p) in found}
            if N in dense and N * 5 // 4 in dense:
                D, censored = dense_step_equivalent(found["moe", N, p], dense)
                per_pair[p] = dict(D=D, r=D / N, censored=censored, moe=found["moe", N, p], dense=dense)
        results["pairs"][N] = per_pair
        if not per_pair:
            continue
        censored = [p for p, v in per_pair.items() if v["censored"]]
        r = [v["r"] for v in per_pair.values()]
        mean, sd, lo, hi = mean_interval(r) if not censored else (float("nan"),) * 4
        results["horizons"][N] = dict(tokens=N * TOKENS_PER_STEP, pairs=list(per_pair), r_mean=mean, r_sd=sd,
                                      r_low=lo, r_high=hi, censored=censored)
        gap = [v["moe"] - v["dense"][N] for v in per_pair.values()]
        gain = [v["dense"][N * 5 // 4] - v["dense"][N] for v in per_pair.values()]  # dense's 25% more steps
        results["horizons"][N].update(moe_minus_dense=sum(gap) / len(gap), dense_gain_of_25pct=sum(gain) / len(gain))
        rows.append(f"| {N} | {N * TOKENS_PER_STEP / 1e6:.1f}M | {len(per_pair)} ({', '.join(map(str, per_pair))}) | "
                    f"{sum(gap) / len(gap):+.4f} | {sum(gain) / len(gain):+.4f} | "
                    + ", ".join(f"{v['r']:.3f}" + ("+" if v["censored"] else "") for v in per_pair.values())
                    + (f" | {mean:.3f} ± {sd:.3f} | [{lo:.3f}, {hi:.3f}] |" if not censored else
                       f" | censored in pairs {censored} | - |"))
    print("| horizon N (steps) | tokens | pairs | MoE - dense at N (mean) | dense 1.25 N - dense N (mean) | "
          "D/N per pair | D/N mean ± std | 95% interval |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))

    # growth: r(2000) - r(500) over the pairs both horizons have
    first, last = results["pairs"].get(HORIZONS[0], {}), results["pairs"].get(HORIZONS[-1], {})
    both = [p for p in GROWTH_PAIRS if p in first and p in last]
    if len(both) >= 2:
        diffs = [last[p]["r"] - first[p]["r"] for p in both]
        test = stats.ttest_1samp(diffs, 0.0)
        mean, sd, lo, hi = mean_interval(diffs)
        verdict = "not separated" if test.pvalue >= 0.05 else ("grows" if mean > 0 else "shrinks")
        results["growth"] = dict(pairs=both, mean=mean, sd=sd, low=lo, high=hi, p=float(test.pvalue),
                                 verdict=verdict)
        print(f"\nr({HORIZONS[-1]}) - r({HORIZONS[0]}) over pairs {both}: {mean:+.4f} ± {sd:.4f}, paired p = "
              f"{test.pvalue:.3g}, 95% [{lo:+.4f}, {hi:+.4f}]: {verdict}")

    # the trend: least squares of r on log2(tokens) over every pair's points; a censored point is only a lower
    # bound, so no line is drawn through a horizon that has one
    censored = {N: [p for p, v in per_pair.items() if v["censored"]] for N, per_pair in results["pairs"].items()}
    points = [(math.log2(N * TOKENS_PER_STEP), v["r"]) for N, per_pair in results["pairs"].items()
              for v in per_pair.values()]
    if any(censored.values()):
        print(f"\ntrend: not fitted while pairs are censored ({ {N: c for N, c in censored.items() if c} })")
    elif len({x for x, _ in points}) >= 2 and len(points) >= 3:
        fit = stats.linregress([x for x, _ in points], [y for _, y in points])
        n = len(points)
        t = stats.t.ppf(0.975, n - 2)
        x0 = math.log2(SPEEDRUN_TOKENS)
        xs = [x for x, _ in points]
        xbar = sum(xs) / n
        sxx = sum((x - xbar) ** 2 for x in xs)
        resid = math.sqrt(sum((y - fit.intercept - fit.slope * x) ** 2 for x, y in points) / (n - 2))

        def line_at(x):  # the fitted line at log2(tokens) x, and the half-width of its 95% interval there
            return fit.intercept + fit.slope * x, t * resid * math.sqrt(1 / n + (x - xbar) ** 2 / sxx)
        at, half = line_at(x0)
        x1 = math.log2(SAME_TOKENS_PER_PARAM)
        at1, half1 = line_at(x1)
        results["trend"] = dict(slope_per_doubling=fit.slope, slope_low=fit.slope - t * fit.stderr,
                                slope_high=fit.slope + t * fit.stderr, intercept=fit.intercept, points=n,
                                at_speedrun_tokens=at, at_speedrun_low=at - half, at_speedrun_high=at + half,
                                doublings_beyond_data=x0 - max(xs), same_tokens_per_param=SAME_TOKENS_PER_PARAM,
                                at_same_tokens_per_param=at1, at_same_tokens_per_param_low=at1 - half1,
                                at_same_tokens_per_param_high=at1 + half1)
        print(f"\ntrend: r = {fit.intercept:.3f} + {fit.slope:.4f} x log2(tokens), slope per doubling of the "
              f"horizon {fit.slope:+.4f} [{fit.slope - t * fit.stderr:+.4f}, {fit.slope + t * fit.stderr:+.4f}] "
              f"({n} points)")
        print(f"at the speedrun's {SPEEDRUN_TOKENS / 1e9:.2f}B tokens ({x0 - max(xs):.1f} doublings beyond the last "
              f"horizon here): r = {at:.3f}, 95% [{at - half:.3f}, {at + half:.3f}] if the line held")
        bench = json.loads(CPU_BENCH.read_text())
        cpu = ("this size on a CPU, tools/bench.py (" + bench["meta"]["device"] + ")", bench["ratios"]["step_ms"])
        for label, ratio in [*GPU_STEP_RATIOS, cpu]:
            print(f"  against {label}: step ratio {ratio:.2f}: the MoE {'would win' if at > ratio else 'would lose'} "
                  f"per second")
        print(f"so the MoE would win at the speedrun's horizon only with a step under {at:.2f}x dense's (under "
              f"{at - half:.2f}x to be sure at 95%), if the line held that far")
        # a second reading, added before any horizon-2000 run had finished (the registered one is above)
        print(f"at the speedrun's tokens per non-embedding parameter ({SPEEDRUN_TOKENS / (12 * 12 * 768 ** 2):.0f}), "
              f"at this size {SAME_TOKENS_PER_PARAM / 1e6:.1f}M tokens ({x1 - max(xs):.1f} doublings beyond): "
              f"r = {at1:.3f}, 95% [{at1 - half1:.3f}, {at1 + half1:.3f}]")
        if args.plot:
            plot(args.plot, points, results, fit)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")


def plot(path: str, points, results: dict, fit) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install matplotlib")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([2 ** x for x, _ in points], [y for _, y in points], s=14, color="gray", label="pairs")
    for N, h in results["horizons"].items():
        if not math.isnan(h["r_mean"]):
            ax.errorbar([h["tokens"]], [h["r_mean"]], yerr=[[h["r_mean"] - h["r_low"]], [h["r_high"] - h["r_mean"]]],
                        fmt="o", color="C0", capsize=4)
    xs = [min(x for x, _ in points), math.log2(SPEEDRUN_TOKENS)]
    ax.plot([2 ** x for x in xs], [fit.intercept + fit.slope * x for x in xs], "--", color="C1",
            label=f"fit: {fit.slope:+.4f} per doubling (dashed beyond the data)")
    for label, ratio in GPU_STEP_RATIOS:
        ax.axhline(ratio, color="C3", lw=0.6, alpha=0.5)
    ax.axhline(1.0, color="black", lw=0.6)
    ax.axvline(SPEEDRUN_TOKENS, color="C2", lw=0.8, label="the speedrun's 2.4B tokens")
    ax.axvline(SAME_TOKENS_PER_PARAM, color="C4", lw=0.8, label="its tokens per parameter at this size")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (CPU study size: 4 x 128, 4096 tokens a step)")
    ax.set_ylabel("dense steps per MoE step (D / N)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""
Compare training runs from their logs: ours (train_gpt2.py) and the NanoGPT speedrun's own, which share
the line format; the MoE router lines of ours are optional to this reader.

    python tools/compare.py records/                      # every log under records/, one table
    python tools/compare.py logs/a.txt logs/b.txt --target 3.28
    python tools/compare.py records/ --group              # mean, std and p-value per configuration
    python tools/compare.py records/ --group --baseline "dense scale0.01"  # paired and Welch's tests against it
    python tools/compare.py records/ --plot curves.png    # needs matplotlib

A log that is empty, foreign (no step lines) or has no validation line is named on stderr and skipped. A
run that stopped before its last step (crashed, preempted, still running, or cut off mid-line) is listed
as unfinished and left out of the --group statistics. The statistics come from scipy (pip install scipy).
"""
import argparse
import ast
import dataclasses
import difflib
import hashlib
import json
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import repo_root  # noqa: F401  (puts the repository root on sys.path, for train_gpt2)
from train_gpt2 import ROUTERS, Hyperparameters

FENCE = "=" * 100
# flags that do not change what a run computes: runs that differ only in these are one configuration
RUN_CONTROL = {f.name for f in dataclasses.fields(Hyperparameters) if "run_control" in f.metadata["roles"]}
DEFAULTS = dataclasses.asdict(Hyperparameters())

# The readers of train_gpt2.py's line formats (VAL_LINE, TRAIN_LINE, the router lines, PEAK_MEMORY_LINE),
# which are the speedrun's own: a step line may carry extra key:value fields at its end.
STEP_LINE_RE = re.compile(r"^step:(\d+)/(\d+) (val|train)_loss:(\S+) train_time:(\d+)ms step_avg:(\S+)ms((?: \S+:\S+)*)$")
ROUTER_LINE_RE = re.compile(r"^step:(\d+)/(\d+) router layer:(\d+) (.*)$")
PEAK_MEMORY_RE = re.compile(r"^peak memory consumption: (\d+) MiB")


class StepLine(typing.NamedTuple):
    kind: str  # "val" or "train"
    step: int
    num_iterations: int
    loss: float
    train_time_ms: float
    step_avg_ms: float
    extra: dict[str, str]  # fields after the record's, e.g. lr_mult


def parse_step_line(line: str) -> StepLine | None:
    """A val or train line (ours, or the speedrun's own), or None."""
    m = STEP_LINE_RE.match(line)
    if not m:
        return None
    extra = dict(f.split(":", 1) for f in m[7].split())
    return StepLine(m[3], int(m[1]), int(m[2]), float(m[4]), float(m[5]), float(m[6]), extra)


def parse_router_line(line: str) -> tuple[int, int, dict[str, float | list[float]]] | None:
    """A router line: (step, layer, fields), each field a number or a list (one per expert), or None."""
    m = ROUTER_LINE_RE.match(line)
    if not m:
        return None
    fields_ = dict(f.split(":", 1) for f in m[4].split() if ":" in f)
    return int(m[1]), int(m[3]), {k: [float(x) for x in v.split(",")] if "," in v else float(v)
                                  for k, v in fields_.items()}


def parse_peak_memory(line: str) -> int | None:
    m = PEAK_MEMORY_RE.match(line)
    return int(m[1]) if m else None


class LogError(ValueError):
    """A file that cannot be read as a run log; the message says why."""


@dataclass
class Run:
    path: Path
    num_iterations: int
    val: dict = field(default_factory=dict)  # step -> (val_loss, train_time_ms, step_avg_ms)
    train: dict = field(default_factory=dict)  # step -> (train_loss, train_time_ms, step_avg_ms)
    router: dict = field(default_factory=dict)  # step -> layer -> {field: value or [values]}
    hyper: dict | None = None  # our logs' hyperparameters line
    source: str = ""
    peak_mib: int | None = None
    cut_off: bool = False  # the file ends in the middle of a line
    order: str | None = None  # the data order the training data line names (older logs name none)

    @property
    def name(self) -> str:
        stem = self.path.stem
        return f"{self.path.parent.name}/{stem[:8] if re.fullmatch(r'[0-9a-f-]{36}', stem) else stem}"

    @property
    def last_step(self) -> int:
        return max([*self.val, *self.train])

    @property
    def finished(self) -> bool:
        return self.num_iterations in self.val and not self.cut_off

    @property
    def final_val(self) -> float:
        return self.val[max(self.val)][0]

    def crossing(self, target: float) -> tuple[float, float] | None:
        """Where the val loss first reaches target: (step, train time in ms), interpolated linearly between the
        validation before and the first one at or below it."""
        before = None
        for step in sorted(self.val):
            loss, ms = self.val[step][:2]
            if loss <= target:
                if before is None or before[1] == loss:
                    return float(step), ms
                w = (before[1] - target) / (before[1] - loss)  # the fraction of the interval before the crossing
                return before[0] + w * (step - before[0]), before[2] + w * (ms - before[2])
            before = (step, loss, ms)
        return None

    def setting(self, name: str, default=None):
        """A hyperparameter: from our hyperparameters line, else from the source's Hyperparameters class."""
        if self.hyper is not None:
            return self.hyper.get(name, default)
        m = re.search(rf"^\s*{name}\s*:\s*\w+\s*=\s*([\d\s*]+?)\s*(#|$)", self.source, flags=re.M)
        return math.prod(int(x) for x in m[1].split("*")) if m else default

    @property
    def pair_key(self) -> tuple | None:
        """What a matched pair shares: the seed, the data seed and the data order it names. A data seed's
        order changed with the loader, so a log that names no order read the older one (or the record's, 0)."""
        if self.hyper is None:
            return None
        data_seed = self.hyper.get("data_seed", 0)
        order = self.order or ("record" if data_seed == 0 else "windows (older loader)")
        return self.hyper.get("seed"), data_seed, order

    @property
    def tokens_per_step(self) -> int | None:
        batch, length = self.setting("batch_size"), self.setting("sequence_length")
        return batch * length if batch and length else None

    @property
    def mode(self) -> str:
        s = self.setting
        experts = s("num_experts", 1)
        shape = ([f"H{s('expert_hidden')}"] if s("expert_hidden") else []) + (
            [f"S{s('shared_expert_hidden')}"] if s("shared_expert_hidden") else []) + (
            [f"scale{s('mlp_output_scale')}"] if s("mlp_output_scale", 1.0) != 1.0 else [])
        if experts == 1:
            return " ".join(["dense", *shape])
        router = s("router", "learned")
        parts = [f"moe E{experts} top{s('top_k', 1)}", *shape, router]
        if router not in ROUTERS or "router_gate" in ROUTERS[router].takes:  # a router of ours that has no gate
            parts.append(s("router_gate", "renorm"))
        for name, tag in [("aux_loss_coef", "aux"), ("null_expert_bias", "null"), ("router_z_loss_coef", "z"),
                          ("router_bias_rate", "bias")]:
            if s(name, 0):
                parts.append(f"{tag}{s(name)}")
        if s("balance_scope", "micro") == "global":
            parts.append("global")
        if s("router_optimizer", "muon") == "adam":
            parts.append(f"adam-router{s('router_lr')}")
        return " ".join(parts)

    @property
    def branch_scale(self) -> float | None:
        """What multiplies the MLP branch's output at the last validation: mlp_output_scale x the summed gates of
        a token's experts (top_k x the mean gate), averaged over layers. 1 for the dense model and the seed's
        renormalised gate; about p / (p + b) for a null-expert bias b."""
        scale = self.setting("mlp_output_scale", 1.0)
        if self.setting("num_experts", 1) == 1:
            return scale
        if not self.router:
            return None
        layers = self.router[max(self.router)].values()
        gates = [layer["gate_mean"] for layer in layers if "gate_mean" in layer]
        return scale * self.setting("top_k", 1) * sum(gates) / len(gates) if gates else None

    @property
    def config_key(self) -> str:
        """What the run computes: its hyperparameters but run control, and the code that ran (the source the log
        begins with), so that an edited script is another configuration even with the same flags."""
        code = hashlib.sha1(self.source.encode()).hexdigest()[:8]
        # a field that an older log lacks is a flag added since, whose default keeps the old behaviour
        settings = {**DEFAULTS, **self.hyper} if self.hyper is not None else {}
        settings = {k: v for k, v in settings.items() if k not in RUN_CONTROL}
        return json.dumps({**settings, "code": code}, sort_keys=True)


def parse_log(path: Path) -> Run:
    text = path.read_text(errors="replace")
    if not text.strip():
        raise LogError("empty file")
    lines = text.split("\n")
    cut_off = not text.endswith("\n")
    if cut_off:
        lines = lines[:-1]  # the partial last line
    if not lines or lines[0] != FENCE:
        raise LogError("not a run log (a run log begins with the script's source, fenced by a line of 100 '=')")
    end = lines.index(FENCE, 1) if FENCE in lines[1:] else len(lines)
    source, lines = "\n".join(lines[1:end]), lines[end + 1:]
    num_iterations, val, train, router, hyper, peak, order = None, {}, {}, {}, None, None, None
    for line in lines:
        if s := parse_step_line(line):  # a resumed run repeats steps: the last line of a step wins
            (val if s.kind == "val" else train)[s.step] = (s.loss, s.train_time_ms, s.step_avg_ms)
            num_iterations = s.num_iterations
        elif r := parse_router_line(line):
            step, layer, fields_ = r
            router.setdefault(step, {})[layer] = fields_
        elif line.startswith("hyperparameters: "):
            try:
                hyper = ast.literal_eval(line[len("hyperparameters: "):])
            except (ValueError, SyntaxError):
                raise LogError("unreadable hyperparameters line") from None
        elif (mib := parse_peak_memory(line)) is not None:
            peak = mib
        elif line.startswith("training data:") and " order: " in line:
            order = line.split(" order: ", 1)[1].split(";")[0]
    if num_iterations is None:
        raise LogError("not a training log (no step lines)")
    if not val:
        raise LogError("no validation line")
    return Run(path, num_iterations, val, train, router, hyper, source, peak, cut_off, order)


def find_logs(paths: list[str]) -> list[Path]:
    """The .txt files under paths, each run once: a log copied into another folder (tools/ab.py --reuse) or
    named twice is the same run, and counting it twice would shrink every spread."""
    found, first_of = [], {}
    for p in map(Path, paths):
        if p.is_dir():
            candidates = sorted(q for q in p.rglob("*.txt") if q.is_file())
        elif p.is_file():
            candidates = [p]
        else:
            print(f"skipped {p}: no such file or directory", file=sys.stderr)
            continue
        for q in candidates:
            digest = hashlib.sha1(q.read_bytes()).digest()
            if digest in first_of and q.stat().st_size:  # (empty files are skipped as such below)
                first = first_of[digest]
                what = "named twice" if q.resolve() == first.resolve() else f"a copy of {first}"
                print(f"note: {q} is {what}; counted once", file=sys.stderr)
            else:
                first_of[digest] = q
                found.append(q)
    return found


def load_runs(paths: list[str]) -> list[Run]:
    runs = []
    for path in find_logs(paths):
        try:
            runs.append(parse_log(path))
        except (LogError, OSError, UnicodeDecodeError) as e:
            print(f"skipped {path}: {e}", file=sys.stderr)
            continue
        if runs[-1].cut_off:
            print(f"note: {path} ends in the middle of a line; read up to its last complete line", file=sys.stderr)
    return runs

# -----------------------------------------------------------------------------
# statistics: the speedrun's rule is a one-sided one-sample t-test of the final val losses against the target


def scipy_stats():
    try:
        from scipy import stats
    except ImportError:
        raise SystemExit("error: --group and --baseline need scipy: pip install scipy") from None
    return stats


NO_SPREAD = "no spread, n too small"  # a t-test of identical values is undefined, never p = 0


def one_sided_p_value(samples: list[float], target: float) -> float:
    """p-value of 'the mean is below target' (one-sample t-test, alternative 'less'); nan for n < 2 or no spread."""
    if len(samples) < 2 or len(set(samples)) == 1:
        return float("nan")
    return float(scipy_stats().ttest_1samp(samples, target, alternative="less").pvalue)


def fmt_p(samples: list[float], p: float) -> str:
    """A p-value as the tables print it: '-' for fewer than 2 values, NO_SPREAD for identical ones."""
    return NO_SPREAD if len(samples) > 1 and len(set(samples)) == 1 else fmt(p, ".3g")


def paired_test(new: list[float], base: list[float]) -> tuple[float, float, tuple[float, float] | None]:
    """The paired t-test of new - base: statistic, two-sided p and the 95% interval of the mean difference;
    nan and None for fewer than 2 pairs or differences without spread."""
    if len(new) < 2 or len({n - b for n, b in zip(new, base)}) == 1:
        return float("nan"), float("nan"), None
    result = scipy_stats().ttest_rel(new, base)
    interval = result.confidence_interval(0.95)
    return float(result.statistic), float(result.pvalue), (float(interval.low), float(interval.high))


def welch_test(samples: list[float], baseline: list[float]) -> tuple[float, float]:
    """Welch's two-sample t-test (unequal variances) of samples against baseline: (t, two-sided p); nan when
    either side has fewer than 2 runs. t < 0: the samples' mean is lower."""
    if len(samples) < 2 or len(baseline) < 2 or len(set(samples)) == len(set(baseline)) == 1:
        return float("nan"), float("nan")
    result = scipy_stats().ttest_ind(samples, baseline, equal_var=False)
    return float(result.statistic), float(result.pvalue)

# -----------------------------------------------------------------------------
# tables and plots


def fmt(value, spec: str = "", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{unit}"


def fmt_tokens(n: int | None) -> str:
    if n is None:
        return "-"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def runs_table(runs: list[Run], target: float) -> str:
    rows = []
    for run in runs:
        crossing = run.crossing(target)
        last_val = run.val[max(run.val)]
        steps = f"{run.last_step}/{run.num_iterations}" + ("" if run.finished else " unfinished")
        tokens = run.tokens_per_step * run.last_step if run.tokens_per_step else None
        rows.append([run.name, run.mode, steps, fmt(run.final_val, ".4f"),
                     fmt(crossing and crossing[0], ".0f"), fmt(crossing and crossing[1] / 1000, ".1f", " s"),
                     fmt(last_val[2], ".2f", " ms"), fmt_tokens(tokens),
                     fmt(run.peak_mib, "d", " MiB"), fmt(run.branch_scale, ".4g")])
    return markdown(["run", "mode", "steps", "final val", f"step <= {target}", f"time <= {target}",
                     "step_avg", "tokens", "peak memory", "branch scale"], rows)


def groups(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs gathered by configuration, each labelled by its mode and, where configurations share a mode, by
    the settings in which they differ."""
    by_key: dict[str, list[Run]] = {}
    for run in runs:
        by_key.setdefault(run.config_key, []).append(run)
    labelled = {}
    for key, members in by_key.items():
        mode = members[0].mode
        siblings = [k for k, m in by_key.items() if m[0].mode == mode]
        label = mode
        if len(siblings) > 1:
            configs = [json.loads(k) for k in siblings]
            mine = configs[siblings.index(key)]
            differ = [name for name in set().union(*configs) if len({str(c.get(name)) for c in configs}) > 1]
            differ.sort(key=lambda name: (any(name not in c for c in configs), name))  # shared settings first
            label += " (" + ", ".join(f"{name}={mine.get(name)}" for name in differ[:3]) + \
                (", ..." if len(differ) > 3 else "") + ")"
        if label in labelled:  # never merge two configurations under one label
            label += f" #{hashlib.sha1(key.encode()).hexdigest()[:6]}"
        labelled[label] = members
    return labelled


def finals_of(members: list[Run]) -> list[float]:
    """The final validation losses of the finished runs."""
    return [r.final_val for r in members if r.finished]


def mean_sd(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n if n else float("nan")
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")


def mean_step_avg(members: list[Run]) -> float | None:
    avgs = [r.val[max(r.val)][2] for r in members if r.finished and math.isfinite(r.val[max(r.val)][2])]
    return sum(avgs) / len(avgs) if avgs else None


def groups_table(runs: list[Run], target: float) -> str:
    rows = []
    for label, members in groups(runs).items():
        finals = finals_of(members)
        mean, sd = mean_sd(finals)
        rows.append([label, str(len(finals)), fmt(mean, ".4f"), fmt(sd, ".4f"), fmt(mean_step_avg(members), ".2f", " ms"),
                     fmt_p(finals, one_sided_p_value(finals, target)), str(len(members) - len(finals))])
    return markdown(["configuration", "n", "mean final val", "std", "mean step_avg", f"p (mean < {target})",
                     "unfinished"], rows)


def find_baseline(labels: list[str], wanted: str) -> str:
    """The configuration label named by --baseline: an exact label, or the only one that begins with it."""
    if wanted in labels:
        return wanted
    matches = [label for label in labels if label.startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    closest = matches or difflib.get_close_matches(wanted, labels, n=3, cutoff=0)
    raise SystemExit(f"error: --baseline {wanted!r} " + (f"begins {len(matches)} labels" if matches else
                     "is no label") + "; give a whole label, e.g. " + "; ".join(repr(c) for c in closest[:3]))


def matched_pairs(runs: list[Run], base: list[Run]) -> tuple[list[tuple[Run, Run]], int, int]:
    """The finished runs of two configurations matched on (seed, data seed, data order): the pairs, and how
    many finished runs of each side found no partner (a key met twice on one side pairs once)."""
    by_key = {}
    for run in base:
        if run.finished and run.pair_key:
            by_key.setdefault(run.pair_key, run)
    pairs, used = [], set()
    for run in runs:
        if run.finished and run.pair_key in by_key and run.pair_key not in used:
            used.add(run.pair_key)
            pairs.append((run, by_key[run.pair_key]))
    return pairs, len(finals_of(runs)) - len(pairs), len(finals_of(base)) - len(pairs)


def order_counts(members: list[Run]) -> dict:
    """How many finished runs read each data order (data seed 0 is one order; any other seed another)."""
    counts = {}
    for run in members:
        if run.finished and run.pair_key:
            order = "record order" if run.pair_key[1] == 0 else f"{run.pair_key[2].split(' (')[0]} orders"
            counts[order] = counts.get(order, 0) + 1
    return counts


def comparison_table(runs: list[Run], baseline: str) -> str:
    """Each configuration against the baseline's: runs matched on (seed, data seed, data order) give the
    paired difference, its t-test and 95% interval; Welch's two-sample test of all finished runs stands
    beside it. A warning names the runs that read other data orders than the other side's, which the
    pooled test cannot tell from a difference of the configurations."""
    grouped = groups(runs)
    base_label = find_baseline(list(grouped), baseline)
    base_runs = grouped[base_label]
    base = finals_of(base_runs)
    base_mean, base_step = mean_sd(base)[0], mean_step_avg(base_runs)
    rows, warnings = [], []
    for label, members in grouped.items():
        if label == base_label:
            continue
        finals = finals_of(members)
        welch_t, welch_p = welch_test(finals, base)
        pairs, alone, base_alone = matched_pairs(members, base_runs)
        new, old = [a.final_val for a, _ in pairs], [b.final_val for _, b in pairs]
        mean_diff, sd_diff = mean_sd([a - b for a, b in zip(new, old)])
        _, paired_p, interval = paired_test(new, old)
        step = mean_step_avg(members)
        rows.append([label, str(len(finals)), fmt(mean_sd(finals)[0] - base_mean, "+.4f"), fmt(welch_p, ".3g"),
                     str(len(pairs)), f"{fmt(mean_diff, '+.4f')} ± {fmt(sd_diff, '.4f')}",
                     NO_SPREAD if len(pairs) > 1 and sd_diff == 0 else fmt(paired_p, ".3g"),
                     f"[{fmt(interval[0], '+.4f')}, {fmt(interval[1], '+.4f')}]" if interval else "-",
                     f"{alone} / {base_alone}", fmt(step / base_step if step and base_step else None, ".3f")])
        mine, theirs = order_counts(members), order_counts(base_runs)
        if mine.keys() != theirs.keys() or alone or base_alone:
            what = lambda c: ", ".join(f"{n} on {o}" for o, n in sorted(c.items())) or "none"  # noqa: E731
            warnings.append(f"warning: {label}: {alone} of its runs and {base_alone} of {base_label}'s have no "
                            f"matched partner; the runs read {what(mine)} against {what(theirs)}, so the "
                            f"unpaired difference mixes the data with the configurations: trust the paired one")
    table = markdown([f"configuration vs {base_label} (n={len(base)})", "n", "mean diff", "Welch p (two-sided)",
                      "pairs", "paired diff (mean ± std)", "paired p", "95% interval (paired)",
                      "unmatched (this / base)", "step_avg ratio"], rows)
    return "\n".join([table, *warnings])


def plot(runs: list[Run], path: str, target: float, max_moe_panels: int = 4):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    moe_runs = [r for r in runs if r.router][:max_moe_panels]
    fig, axes = plt.subplots(1 + len(moe_runs), 2, figsize=(13, 4.5 * (1 + len(moe_runs))), squeeze=False)
    by_step, by_time = axes[0]
    later = [v[0] for r in runs for s, v in r.val.items() if s > 0] or [target]
    # one colour per configuration, so that seeds of one configuration read as one band; one legend entry each
    configuration = {id(run): label for label, members in groups(runs).items() for run in members}
    colours = {label: plt.cm.tab10(i % 10) for i, label in enumerate(dict.fromkeys(configuration.values()))}
    labelled = set()
    for run in runs:
        steps = sorted(run.val)
        config_label = configuration[id(run)]
        size = sum(label == config_label for label in configuration.values())
        label = None if config_label in labelled else (
            f"{config_label} ({size} runs)" if size > 1 else f"{run.name} ({config_label})")
        labelled.add(config_label)
        style = dict(marker=".", color=colours[config_label], label=label, alpha=0.8)
        by_step.plot(steps, [run.val[s][0] for s in steps], **style)
        timed = [s for s in steps if s > 0]
        by_time.plot([run.val[s][1] / 1000 for s in timed], [run.val[s][0] for s in timed], **style)
    for ax, xlabel in ((by_step, "step"), (by_time, "train time (s)")):
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target}")
        ax.set(xlabel=xlabel, ylabel="val loss", ylim=(min(later + [target]) - 0.02, max(later) + 0.05))
        ax.grid(alpha=0.3)
    by_step.set_title("validation loss by step")
    by_time.set_title("validation loss by training time")
    by_step.legend(fontsize=7)
    for (train_ax, val_ax), run in zip(axes[1:], moe_runs):
        steps = sorted(run.router)
        layers = sorted(run.router[steps[-1]])
        colors = plt.cm.viridis([i / max(1, len(layers) - 1) for i in layers])
        for kind, ax in (("train_load", train_ax), ("val_load", val_ax)):
            for layer, color in zip(layers, colors):
                xs = [s for s in steps if layer in run.router[s] and isinstance(run.router[s][layer].get(kind), list)
                      and sum(run.router[s][layer][kind]) > 0]
                loads = [run.router[s][layer][kind] for s in xs]
                ax.plot(xs, [max(l) for l in loads], color=color, label=f"layer {layer} max")
                ax.plot(xs, [min(l) for l in loads], color=color, linestyle=":")
            experts = len(run.router[steps[-1]][layers[0]]["val_load"])
            ax.axhline(1 / experts, color="gray", linestyle="--", linewidth=1)
            ax.set(xlabel="step", ylabel="fraction of tokens (solid: busiest, dotted: idlest)",
                   title=f"{run.name}: {kind.replace('_', ' ')} per layer")
            ax.grid(alpha=0.3)
        train_ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="LOG_OR_DIR", help="run logs, or folders searched for *.txt")
    parser.add_argument("--target", type=float, default=3.28, help="the val loss to reach (default: 3.28)")
    parser.add_argument("--group", action="store_true", help="statistics per configuration")
    parser.add_argument("--baseline", metavar="LABEL", help="with --group: every configuration against this one "
                        "(its label, or the start of only one label): runs matched on seed, data seed and data "
                        "order give the paired test; Welch's test pools all finished runs")
    parser.add_argument("--plot", metavar="FILE.png", help="plot val loss by step and time, and MoE loads")
    args = parser.parse_args(argv)
    runs = load_runs(args.paths)
    if not runs:
        print("no runs to compare", file=sys.stderr)
        return 1
    print(runs_table(runs, args.target))
    if args.group or args.baseline:
        print()
        print(groups_table(runs, args.target))
    if args.baseline:
        print()
        print(comparison_table(runs, args.baseline))
    if args.plot:
        plot(runs, args.plot, args.target)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
A/B test of a tweak in one command: the working tree's train_gpt2.py ("new") against a git ref's ("base",
HEAD by default), with the same flags, N runs a side, interleaved new, base, new, base, ... so that a drift
of the machine's speed falls on both sides alike. Run i of each side uses --seed and --data_seed S+i (S =
--seed_offset), so the pairs are matched: the same initialisation and the same data order.

    python tools/ab.py --runs 6 -- --num_iterations 500            # new vs HEAD, any trainer flags after --
    python tools/ab.py --base main~3 --runs 3 --target 3.28 -- ...  # against another commit
    python tools/ab.py --same_script --new_flags "--mlp_output_scale 0.3" --runs 6 -- ...  # flags only

It prints each side's final val loss (mean ± std), the difference with Welch's and the paired t-test (and the
latter's 95% interval), the step_avg ratio, the time-to-target ratio where both sides reach the target, and
the speedrun's rule for a record claim (mean below the target, one-sided p < 0.01). `--jobs 2` runs two at a
time in that order (each pair's two sides side by side, on a machine with room for both). Ctrl-C stops the
running runs cleanly; the pairs already done still give the table, and `--table DIR` prints it again later.
Needs scipy.
"""
import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from compare import (NO_SPREAD, LogError, fmt, fmt_p, markdown, mean_sd, one_sided_p_value, paired_test,
                     parse_log, welch_test)
from repo_root import ROOT
from train_gpt2 import parse_args

MANIFEST = "ab.json"  # which log is which side and pair


def base_script(ref: str, out: Path) -> Path:
    """REF's train_gpt2.py, written into the results folder (the log begins with its source anyway)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"error: --base {ref}: not a git ref here ({sha.stderr.strip().splitlines()[-1]})")
    source = subprocess.run(["git", "show", f"{sha.stdout.strip()}:train_gpt2.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    path = out / f"train_gpt2_{sha.stdout.strip()}.py"
    path.write_text(source)
    return path


def launcher(script: Path, nproc: int | None, check_only: bool = False) -> dict:
    """run.sh's environment for a run of this script (run.sh expands --smoke and checks the flags first)."""
    env = {**os.environ, "SCRIPT": str(script), **({"NPROC": str(nproc)} if nproc else {})}
    return {**env, "CHECK_ONLY": "1"} if check_only else env


def check_side(name: str, script: Path, flags: list[str], nproc: int | None) -> None:
    """The side's flags and data, checked by its own script before any run starts."""
    result = subprocess.run(["bash", str(ROOT / "run.sh"), *flags], cwd=ROOT, capture_output=True, text=True,
                            env=launcher(script, nproc, check_only=True))
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["(no output)"]
        raise SystemExit(f"error: the {name} side ({script.name}) refuses its flags: {lines[-1]}")


def start_run(flags: list[str], env: dict, out: Path) -> tuple[subprocess.Popen, str | None]:
    """One training run through run.sh, in a session of its own (so a terminal's Ctrl-C reaches only this
    script, which asks the run to checkpoint and stop), and the name of the log it creates: the launch waits
    for it, so runs that share a folder are never mixed up."""
    before = set(out.glob("*.txt"))
    proc = subprocess.Popen(["bash", str(ROOT / "run.sh"), *flags], cwd=ROOT, env=env, start_new_session=True)
    try:
        while True:
            logs = sorted(set(out.glob("*.txt")) - before)
            if logs or proc.poll() is not None:
                return proc, logs[0].name if logs else None
            time.sleep(0.2)
    except KeyboardInterrupt:  # before the run was handed back: stop it here
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise


def check_entry(run, entry: dict, out: Path) -> None:
    """Refuse, in one line, a log that is not the run its manifest entry describes: another script, seed, data
    seed or flag (a folder edited by hand, or logs swapped between pairs)."""
    where = f"error: {out / entry['log']}: {MANIFEST} has it as pair {entry['pair'] + 1}'s {entry['side']} side"
    fix = "; put the right log back, or delete the entry and rerun that pair"
    if "script_sha" in entry and hashlib.sha1((run.source + "\n").encode()).hexdigest() != entry["script_sha"]:
        raise SystemExit(f"{where}, but the log's source is another script{fix}")
    try:
        expected = dataclasses.asdict(parse_args(entry["flags"]))
    except SystemExit:  # flags of another version of the trainer: only the seeds are compared
        expected = dict(seed=entry["seed"], data_seed=entry["seed"])
    differ = [f"{k} {run.hyper.get(k)!r} (manifest {v!r})" for k, v in expected.items()
              if k not in ("log_dir", "resume", "check_only") and run.hyper is not None and k in run.hyper
              and run.hyper[k] != v]
    if run.hyper is None or differ:
        raise SystemExit(f"{where}, but it ran " + (", ".join(differ) or "no hyperparameters line") + fix)


def load_pairs(out: Path) -> tuple[dict, dict]:
    """The manifest and, per side, {pair: Run} of the finished runs, each checked against its entry; a log
    whose bytes equal another's is one run, counted once."""
    if not (out / MANIFEST).is_file():
        raise SystemExit(f"error: {out} has no {MANIFEST}, so it is not an A/B folder (tools/ab.py writes one)")
    manifest = json.loads((out / MANIFEST).read_text())
    runs, seen = {"new": {}, "base": {}}, {}
    for entry in manifest["runs"]:
        if entry.get("log") and (out / entry["log"]).is_file():
            digest = hashlib.sha1((out / entry["log"]).read_bytes()).hexdigest()
            if digest in seen:
                print(f"note: {entry['log']} (pair {entry['pair'] + 1}, {entry['side']}) is a copy of {seen[digest]}; "
                      f"counted once", file=sys.stderr)
                continue
            seen[digest] = entry["log"]
            try:
                run = parse_log(out / entry["log"])
            except LogError:  # stopped before its first step
                continue
            if run.finished:
                check_entry(run, entry, out)
                runs[entry["side"]][entry["pair"]] = run
    return manifest, runs


def first_to_target(new, base, target: float) -> str | None:
    """Which side of a pair reaches target first in train time (interpolated between validations); a side
    that reaches it wins against one that never does; None when neither does."""
    n, b = new.crossing(target), base.crossing(target)
    if n is None and b is None:
        return None
    return "new" if b is None or (n is not None and n[1] < b[1]) else "base"


def table(out: Path) -> str:
    manifest, runs = load_pairs(out)
    target = manifest["target"]
    pairs = sorted(runs["new"].keys() & runs["base"].keys())
    lines = [f"A/B in {out}: new = {manifest['new']}, base = {manifest['base']}",
             f"shared flags: {' '.join(manifest['flags']) or '(none)'}"]
    rows = []
    for side in ("new", "base"):
        finals = [r.final_val for r in runs[side].values()]
        mean, sd = mean_sd(finals)
        avgs = [r.val[max(r.val)][2] for r in runs[side].values()]
        rows.append([side, manifest[side], " ".join(manifest[f"{side}_flags"]) or "-", str(len(finals)),
                     f"{fmt(mean, '.4f')} ± {fmt(sd, '.4f')}", fmt(sum(avgs) / len(avgs) if avgs else None, ".2f", " ms"),
                     fmt_p(finals, one_sided_p_value(finals, target))])
    lines += ["", markdown(["side", "script", "own flags", "n", "final val (mean ± std)", "step_avg",
                            f"p (mean < {target})"], rows)]
    new, base = [runs["new"][p].final_val for p in pairs], [runs["base"][p].final_val for p in pairs]
    diffs = [n - b for n, b in zip(new, base)]
    welch_t, welch_p = welch_test([r.final_val for r in runs["new"].values()],
                                  [r.final_val for r in runs["base"].values()])
    paired_t, paired_p, interval = paired_test(new, base)
    step_ratios = [runs["new"][p].val[max(runs["new"][p].val)][2] / runs["base"][p].val[max(runs["base"][p].val)][2]
                   for p in pairs]
    reach = [(runs["new"][p].crossing(target), runs["base"][p].crossing(target)) for p in pairs]
    time_ratios = [n[1] / b[1] for n, b in reach if n and b and b[1] > 0]
    firsts = [first_to_target(runs["new"][p], runs["base"][p], target) for p in pairs]
    mean_diff, sd_diff = mean_sd(diffs)
    lines += ["", markdown(["new - base", "value"], [
        ["matched pairs", str(len(pairs))],
        ["mean difference of final val (paired)", f"{fmt(mean_diff, '+.4f')} ± {fmt(sd_diff, '.4f')}"],
        ["Welch's t-test (all finished runs)", f"t = {fmt(welch_t, '.2f')}, p = {fmt(welch_p, '.3g')}"],
        ["paired t-test", NO_SPREAD if len(diffs) > 1 and len(set(diffs)) == 1 else
         f"t = {fmt(paired_t, '.2f')}, p = {fmt(paired_p, '.3g')}"],
        ["95% interval of the mean difference (paired t)",
         f"[{fmt(interval[0], '+.4f')}, {fmt(interval[1], '+.4f')}]" if interval else "-"],
        ["step_avg ratio (mean over pairs)", fmt(sum(step_ratios) / len(step_ratios) if step_ratios else None, ".3f")],
        [f"time-to-{target} ratio (interpolated; pairs where both reach it)",
         f"{fmt(sum(time_ratios) / len(time_ratios) if time_ratios else None, '.3f')} ({len(time_ratios)} pairs)"],
        [f"first to {target} (one side reaching it wins the pair)",
         f"new in {firsts.count('new')}, base in {firsts.count('base')}, neither in {firsts.count(None)}"],
    ])]
    new_finals = [r.final_val for r in runs["new"].values()]
    p_record = one_sided_p_value(new_finals, target)
    verdict = ("cannot be tested against" if len(new_finals) < 2 or len(set(new_finals)) == 1 else
               "meets" if mean_sd(new_finals)[0] < target and p_record < 0.01 else "does not meet")
    lines += ["", f"record rule (mean final val < {target}, one-sided p < 0.01): the new side {verdict} it "
                  f"(n = {len(new_finals)}, p = {fmt_p(new_finals, p_record)})"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="the git ref whose train_gpt2.py is the base (default HEAD)")
    parser.add_argument("--same_script", action="store_true",
                        help="both sides run the working tree's script and differ only in --new_flags/--base_flags")
    parser.add_argument("--new_flags", default="", help="trainer flags for the new side only (quoted)")
    parser.add_argument("--base_flags", default="", help="trainer flags for the base side only (quoted)")
    parser.add_argument("--runs", type=int, default=3, help="runs a side (default 3)")
    parser.add_argument("--seed_offset", type=int, default=1,
                        help="pair i uses --seed and --data_seed seed_offset + i (default 1)")
    parser.add_argument("--target", type=float, default=3.28, help="the val loss target (default 3.28)")
    parser.add_argument("--nproc", type=int, help="processes per run (default: run.sh's, one per GPU, else 1)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, started in the order new, base, new, ... (default 1; 2 suits a 2-core "
                        "CPU with OMP_NUM_THREADS=1; on GPUs keep 1: every run uses all the devices it sees)")
    parser.add_argument("--out", help="the folder for the logs (default logs/ab_<time>)")
    parser.add_argument("--reuse", metavar="DIR", nargs="+", default=[],
                        help="earlier A/B folders: a finished run there of the same script, flags and seed is copied, "
                        "not run again")
    parser.add_argument("--table", metavar="DIR", help="print the table of an earlier A/B folder and exit")
    args = parser.parse_args(own)
    if args.table:
        print(table(Path(args.table)))
        return 0
    if args.runs < 1 or args.jobs < 1:
        parser.error("--runs and --jobs must be at least 1")
    out = Path(args.out or ROOT / "logs" / f"ab_{datetime.datetime.now():%Y%m%d_%H%M%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    new_script = ROOT / "train_gpt2.py"
    base = new_script if args.same_script else base_script(args.base, out)
    sides = {"new": (new_script, shlex.split(args.new_flags)), "base": (base, shlex.split(args.base_flags))}
    for name, (script, own_flags) in sides.items():
        check_side(name, script, [*flags, *own_flags, "--data_seed", "1"], args.nproc)
    manifest = dict(new="working tree", base="working tree" if args.same_script else f"{args.base} ({base.name})",
                    new_flags=sides["new"][1], base_flags=sides["base"][1], flags=flags, target=args.target,
                    nproc=args.nproc, runs=[])
    if (out / MANIFEST).is_file():  # a folder with pairs already done: go on from there
        manifest["runs"] = json.loads((out / MANIFEST).read_text())["runs"]
    done = {(e["side"], e["pair"]) for e in manifest["runs"] if e.get("status") == 0}
    reusable = {(e["script_sha"], tuple(e["flags"])): Path(folder) / e["log"] for folder in args.reuse
                for e in json.loads((Path(folder) / MANIFEST).read_text())["runs"]
                if e.get("status") == 0 and e.get("log") and "script_sha" in e}
    print(f"ab: {args.runs} pairs into {out}" + (f", {args.jobs} runs at a time" if args.jobs > 1 else ""),
          flush=True)
    queue = [(pair, side) for pair in range(args.runs) for side in ("new", "base") if (side, pair) not in done]
    running = {}  # Popen -> its manifest entry

    def save():
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))

    try:
        while queue or running:
            while queue and len(running) < args.jobs:
                pair, side = queue.pop(0)
                seed = args.seed_offset + pair
                script, own_flags = sides[side]
                run_flags = [*flags, *own_flags, "--seed", str(seed), "--data_seed", str(seed), "--log_dir", str(out)]
                print(f"ab: pair {pair + 1}/{args.runs}, {side}: {script.name} {shlex.join(run_flags)}", flush=True)
                sha = hashlib.sha1(script.read_bytes()).hexdigest()
                entry = dict(side=side, pair=pair, seed=seed, status=None, log=None, script_sha=sha,
                             flags=[*flags, *own_flags, "--seed", str(seed), "--data_seed", str(seed)])
                manifest["runs"] = [e for e in manifest["runs"] if (e["side"], e["pair"]) != (side, pair)] + [entry]
                earlier = reusable.get((sha, tuple(entry["flags"])))
                if earlier:
                    shutil.copy(earlier, out / earlier.name)
                    entry.update(status=0, log=earlier.name)
                    print(f"ab: reused {earlier}", flush=True)
                else:
                    entry["status"] = "interrupted"  # until the run returns
                    save()
                    proc, entry["log"] = start_run(run_flags, launcher(script, args.nproc), out)
                    running[proc] = entry
                save()
            for proc in [p for p in running if p.poll() is not None]:
                entry = running.pop(proc)
                entry["status"] = proc.returncode
                save()
                print(f"ab: pair {entry['pair'] + 1}/{args.runs}, {entry['side']}: exited {proc.returncode}",
                      file=sys.stderr if proc.returncode else sys.stdout, flush=True)
            if running:
                time.sleep(0.5)
    except KeyboardInterrupt:
        for proc in running:  # run.sh hands SIGTERM to the workers, which checkpoint and stop
            proc.send_signal(signal.SIGTERM)
        for proc in running:
            proc.wait()
        save()
        print("\nab: interrupted; the table of the pairs done so far:", file=sys.stderr)
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

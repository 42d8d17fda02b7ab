"""
The GPU proof in one command: on one CUDA GPU, show that the trainer's GPU path works and how fast it is,
in about 6 minutes (compilation included), and write every figure into one folder ready to commit.

    python gpu_check.py                       # all stages, into records/<date>_<device>/
    python gpu_check.py --out DIR --skip e2e  # another folder; leave stages out
    python gpu_check.py --dry                 # the same stages at tiny sizes, on the CPU (the tests run this)

Stages, in order; the first failure stops the check with a one-line reason:
  tests  tests/test_cuda.py: the grouped GEMM in bf16 against a loop for skewed expert loads, fullgraph
         compile, no host sync in a compiled MoE train step, DDP over NCCL with an idle expert
  bench  bench.py at full size, compiled, bf16, dense vs the seed's MoE: device batch 64, then 32 (JSON)
  e2e    ./run_moe.sh, then ./run_dense.sh, at full model size on generated full-vocabulary shards: a
         validation, a SIGTERM that checkpoints, --resume latest to the end; each log is checked
then the summary: README.md and summary.json in the folder, with the device, the versions, each figure and
each stage's time. All stages share one inductor cache directory (--work), so compiled kernels are reused
between stages and by a second run of the check on the same machine.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STAGES = ["tests", "bench", "e2e"]
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:(\S+) train_time:(\d+)ms step_avg:(\S+)ms$")
TRAIN_LINE = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) train_time:(\d+)ms step_avg:(\S+)ms$")
PEAK_LINE = re.compile(r"^peak memory consumption: (\d+) MiB$")

# the end-to-end runs: the full model, one micro-batch of 64 sequences per step (the record's per-GPU batch)
E2E_FULL = dict(model=[], batch=64, sequence_length=1024, vocab_size=50304, steps=40, stop_after=20)
E2E_DRY = dict(model=["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--dtype", "float32"],
               batch=4, sequence_length=64, vocab_size=512, steps=8, stop_after=3)


class CheckFailed(Exception):
    """A stage failed; the message is the one-line reason."""


class Check:
    def __init__(self, args):
        self.out, self.work, self.dry = Path(args.out), Path(args.work), args.dry
        self.deadline = time.monotonic() + args.budget_s
        self.budget_s = args.budget_s
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        cache = self.work / "inductor"
        self.env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "NPROC": "1",
                    "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton"),
                    "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
        if self.dry:
            self.env["OMP_NUM_THREADS"] = "1"
        self.summary = dict(stages={}, figures={}, files=[])

    def remaining(self, what: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise CheckFailed(f"{what}: the check ran out of its {self.budget_s:g} s budget (--budget_s)")
        return left

    def keep(self, name: str, text: str) -> Path:
        path = self.out / name
        path.write_text(text)
        self.summary["files"].append(name)
        return path

    def run(self, name: str, cmd: list[str]) -> subprocess.CompletedProcess:
        """Run a command in the repository; its output is kept as <name>.out. A timeout is a failure."""
        try:
            result = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True,
                                    timeout=self.remaining(name))
        except subprocess.TimeoutExpired as e:
            out = e.stdout or ""
            self.keep(f"{name}.out", out.decode(errors="replace") if isinstance(out, bytes) else out)
            raise CheckFailed(f"{name}: still running when the {self.budget_s:g} s budget ran out (--budget_s)")
        self.keep(f"{name}.out", result.stdout + result.stderr)
        return result


def last_error_line(text: str) -> str:
    """The most telling line of a failed command's output: pytest's FAILED line, else the last error line."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for pattern in (r"^FAILED ", r"^(error|Error|\w+Error)\b", r"Error"):
        found = [l for l in lines if re.search(pattern, l)]
        if found:
            return found[0 if pattern == r"^FAILED " else -1][:300]
    return lines[-1][:300] if lines else "(no output)"


# -----------------------------------------------------------------------------
# the stages


def stage_tests(check: Check) -> dict:
    result = check.run("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"])
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", result.stdout)}
    if result.returncode != 0:
        raise CheckFailed(f"tests: {last_error_line(result.stdout + result.stderr)}")
    return counts


def stage_bench(check: Check) -> dict:
    figures = {}
    for batch in (64, 32):
        name = f"bench_b{batch}"
        json_path = check.out / f"{name}.json"
        size = (["--size", "small", "--device_batch_size", "2", "--steps", "2", "--warmup", "1", "--no-health"]
                if check.dry else ["--size", "full", "--device_batch_size", str(batch)]
                + ([] if batch == 64 else ["--no-health", "--steps", "20"]))  # graph health once is enough
        result = check.run(name, [sys.executable, "bench.py", *size, "--json", str(json_path)])
        if result.returncode != 0:
            raise CheckFailed(f"{name}: {last_error_line(result.stdout + result.stderr)}")
        check.summary["files"].append(json_path.name)
        figures[name] = json.loads(json_path.read_text())
        if check.dry:
            break  # one small size stands for both
    return figures


def make_shards(check: Check, sizes: dict) -> Path:
    """Full-vocabulary synthetic shards (every token id can occur): enough for one pass of the e2e runs."""
    shards = check.work / f"shards_v{sizes['vocab_size']}"
    tokens_per_step = sizes["batch"] * sizes["sequence_length"]
    result = check.run("e2e_shards", [sys.executable, "data/synthetic.py", "--out", str(shards),
                                      "--vocab_size", str(sizes["vocab_size"]), "--train_shards", "1",
                                      "--shard_tokens", str(tokens_per_step * (sizes["steps"] + 2)),
                                      "--val_tokens", str(tokens_per_step + 1)])
    if result.returncode != 0:
        raise CheckFailed(f"e2e: generating shards: {last_error_line(result.stderr)}")
    return shards


def e2e_run(check: Check, script: str, shards: Path, sizes: dict) -> dict:
    """One launcher at full model size: train, SIGTERM after a few steps (a checkpoint), --resume latest to the
    end; then check its log. Returns the log's figures."""
    mode = "moe" if "moe" in script else "dense"
    log_dir = check.work / f"e2e_{mode}"
    shutil.rmtree(log_dir, ignore_errors=True)
    steps, batch = sizes["steps"], sizes["batch"]
    flags = [*sizes["model"], "--input_bin", str(shards / "synthetic_train_*.bin"),
             "--input_val_bin", str(shards / "synthetic_val_*.bin"), "--vocab_size", str(sizes["vocab_size"]),
             "--sequence_length", str(sizes["sequence_length"]), "--batch_size", str(batch),
             "--device_batch_size", str(batch), "--val_tokens", str(batch * sizes["sequence_length"]),
             "--num_iterations", str(steps), "--warmdown_iters", str(steps // 3), "--val_loss_every", str(steps // 2),
             "--log_dir", str(log_dir), "--keep_checkpoints", "1", "--seed", "1"]
    # first part: stopped by SIGTERM once a step after stop_after is logged (run.sh passes it to the workers)
    output = []
    proc = subprocess.Popen([f"./{script}", *flags], cwd=ROOT, env=check.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    # a run that hangs without printing is killed at the budget's end too, not only one that prints
    watchdog = threading.Timer(check.remaining(f"e2e {mode}"), os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    signalled = False
    for line in proc.stdout:
        output.append(line)
        m = TRAIN_LINE.match(line.strip())
        if m and int(m[1]) >= sizes["stop_after"] and not signalled:
            proc.send_signal(signal.SIGTERM)
            signalled = True
    status = proc.wait()
    watchdog.cancel()
    check.remaining(f"e2e {mode}")  # killed by the watchdog: say so
    check.keep(f"e2e_{mode}_part1.out", "".join(output))
    if status != 0 or not signalled:
        raise CheckFailed(f"e2e {mode}: the first part exited {status} "
                          f"{'after' if signalled else 'before'} the SIGTERM: {last_error_line(''.join(output))}")
    result = check.run(f"e2e_{mode}_resume", [f"./{script}", *flags, "--resume", "latest"])
    if result.returncode != 0:
        raise CheckFailed(f"e2e {mode}: --resume latest failed: {last_error_line(result.stdout + result.stderr)}")
    (log,) = log_dir.glob("*.txt")
    text = log.read_text()
    check.keep(f"e2e_{mode}.txt", text)
    return check_log(text, mode, steps, cuda=not check.dry)


def check_log(text: str, mode: str, steps: int, cuda: bool) -> dict:
    """What a healthy run's log shows; a CheckFailed naming the first thing missing."""
    lines = text.splitlines()
    val = {int(m[1]): float(m[3]) for m in map(VAL_LINE.match, lines) if m}
    train = {int(m[1]): (float(m[3]), float(m[5])) for m in map(TRAIN_LINE.match, lines) if m}
    problems = []
    if 0 not in val or steps not in val:
        problems.append(f"validation lines at steps {sorted(val)}, not at 0 and {steps}")
    elif not all(v == v and abs(v) != float("inf") for v in [*val.values(), *(t[0] for t in train.values())]):
        problems.append("a non-finite loss")
    elif not val[steps] < val[0]:
        problems.append(f"the val loss did not fall ({val[0]:.4f} -> {val[steps]:.4f})")
    if sorted(train) != list(range(1, steps + 1)):
        problems.append(f"train steps {min(train, default=None)}..{max(train, default=None)} of 1..{steps}")
    if not any("stopped by SIGTERM: checkpoint" in l for l in lines) or not any(l.startswith("resume: from") for l in lines):
        problems.append("no 'stopped by SIGTERM' checkpoint and 'resume: from' line")
    if mode == "moe" and not any(" router layer:" in l for l in lines):
        problems.append("no router lines")
    peak = [int(m[1]) for m in map(PEAK_LINE.match, lines) if m]
    if cuda and not peak:
        problems.append("no peak-memory line")
    if problems:
        raise CheckFailed(f"e2e {mode}: " + "; ".join(problems))
    return dict(val_loss_start=val[0], val_loss_end=val[steps], step_avg_ms=train[steps][1],
                peak_memory_mib=max(peak) if peak else None)


def stage_e2e(check: Check) -> dict:
    sizes = E2E_DRY if check.dry else E2E_FULL
    shards = make_shards(check, sizes)
    return {mode: e2e_run(check, script, shards, sizes) for mode, script in (("moe", "run_moe.sh"),
                                                                             ("dense", "run_dense.sh"))}


# -----------------------------------------------------------------------------
# the summary


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summary_markdown(s: dict) -> str:
    lines = [f"# GPU check: {s['device']}", "",
             f"- device: {s['device']}; torch {s['torch']}, CUDA {s['cuda']}; {s['date']}",
             f"- command: `{s['command']}`", f"- result: **{s['result']}**", "",
             "| stage | status | time |", "|---|---|---|"]
    lines += [f"| {name} | {st['status']} | {st.get('seconds', 0):.0f} s |" for name, st in s["stages"].items()]
    figures = s["figures"]
    if "tests" in figures:
        lines += ["", "Tests (`tests/test_cuda.py`): " + ", ".join(f"{n} {k}" for k, n in figures["tests"].items())]
    for name, bench in figures.get("bench", {}).items():
        meta, r, ratios = bench["meta"], bench["results"], bench["ratios"]
        lines += ["", f"## {name}: {meta['size']} size, {meta['dtype']}, {'compiled' if meta['compile'] else 'eager'}, "
                      f"{meta['device_batch_size']} x {meta['sequence_length']} tokens per step", "",
                  f"`{meta['command']}`", "", "| measure | dense | MoE | MoE/dense |", "|---|---|---|---|"]
        rows = [("train step (ms)", "step_ms", ".2f"), ("MLP layer fwd+bwd (ms)", "layer_ms", ".2f"),
                ("tokens/s", "tokens_per_s", ",.0f"), ("MFU", "mfu", ".1%"), ("peak memory (MiB)", "peak_memory_mib", ",.0f"),
                ("optimizer step (ms)", "optimizer_ms", ".2f"), ("host syncs per step", "host_syncs_per_step", "d"),
                ("graph breaks", "graph_breaks", "d"), ("recompiles", "recompiles", "d")]
        for label, key, spec in rows:
            ratio = ratios.get(key) if key not in ("host_syncs_per_step", "graph_breaks", "recompiles") else None
            lines.append(f"| {label} | {fmt(r['dense'].get(key), spec)} | {fmt(r['moe'].get(key), spec)} | "
                         f"{fmt(ratio, '.3f')} |")
        lines += ["", f"MoE/dense train step: {fmt(ratios.get('step_ms'), '.3f')}x (the MoE wins in wall-clock below "
                      f"1.125x; the target is 1.05x). Dense: {fmt(r['dense'].get('tokens_per_s'), ',.0f')} tokens/s "
                      f"on this device; the record ran ~462,000 tokens/s per H100."]
    if "e2e" in figures:
        lines += ["", "## End to end (`run_moe.sh`, `run_dense.sh`, one process, SIGTERM and `--resume latest`)", "",
                  "| run | val loss at 0 | val loss at the end | step_avg (ms) | peak memory (MiB) |", "|---|---|---|---|---|"]
        for mode, f in figures["e2e"].items():
            lines.append(f"| {mode} | {f['val_loss_start']:.4f} | {f['val_loss_end']:.4f} | {f['step_avg_ms']:.2f} | "
                         f"{fmt(f['peak_memory_mib'], 'd')} |")
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in s["files"]), ""]
    return "\n".join(lines)


def device_description(dry: bool) -> tuple[str, str | None]:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), torch.version.cuda
    return ("CPU (dry run)" if dry else "CPU"), torch.version.cuda


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the results folder (default: records/<date>_<device>/)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "modded-nanogpt-moe-gpu-check"),
                        help="shards, run folders and the shared inductor cache (not results)")
    parser.add_argument("--skip", default="", help=f"comma-separated stages to leave out, of {','.join(STAGES)}")
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU: check the check, not the GPU")
    parser.add_argument("--budget_s", type=float, default=540, help="stop with a failure after this many seconds")
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(STAGES):
        parser.error(f"--skip {args.skip}: unknown stage(s) {sorted(skip - set(STAGES))}; the stages are {STAGES}")
    import torch
    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run it on a GPU machine, or with --dry to check the check on a CPU",
              file=sys.stderr)
        return 2
    device, cuda_version = device_description(args.dry)
    date = datetime.date.today().isoformat()
    if args.out is None:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", device.removeprefix("NVIDIA ")).strip("_")
        args.out = str(ROOT / "records" / f"{date}_{slug}")
    check = Check(args)
    check.summary.update(device=device, torch=torch.__version__, cuda=cuda_version, date=date,
                         command=" ".join(["python", "gpu_check.py", *(argv if argv is not None else sys.argv[1:])]))
    print(f"gpu_check: {device}, torch {torch.__version__}, CUDA {cuda_version}; results into {check.out}", flush=True)
    failed = None
    for name, stage in (("tests", stage_tests), ("bench", stage_bench), ("e2e", stage_e2e)):
        if name in skip:
            check.summary["stages"][name] = dict(status="skipped")
            continue
        t0 = time.monotonic()
        try:
            check.summary["figures"][name] = stage(check)
            status = "ok"
        except CheckFailed as e:
            failed, status = str(e), "FAILED"
        seconds = time.monotonic() - t0
        check.summary["stages"][name] = dict(status=status, seconds=round(seconds, 1))
        print(f"gpu_check: {name} {status} in {seconds:.0f} s", flush=True)
        if failed:
            break
    check.summary["result"] = f"failed: {failed}" if failed else "all stages passed"
    check.summary["files"] += ["README.md", "summary.json"]
    (check.out / "summary.json").write_text(json.dumps(check.summary, indent=2))
    (check.out / "README.md").write_text(summary_markdown(check.summary))
    print(summary_markdown(check.summary))
    if failed:
        print(f"gpu_check: FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
The GPU proof in one command, sized for one call of at most 10 minutes on one H100/H200 with a cold compile
cache (540 s by default), that keeps every figure it earns: what only a GPU gives comes first, each stage's
results are written the moment the stage ends (and on SIGTERM or Ctrl-C), a stage ended at its cap still
hands over what it measured (marked partial), a failed stage does not stop the stages after it, and a stage
that overruns its time is ended with its whole process tree.

    python tools/gpu_check.py                        # the default stages, into records/<date>_<device>/
    python tools/gpu_check.py --out DIR --stages tests,bench_fast,bench_b32
    python tools/gpu_check.py --dry                  # the same stages at tiny sizes on the CPU (the tests run this)

Stages (in order; * = not run unless named in --stages):
  preflight   every import and tool the stages need, CUDA, free disk, and the toolchain at work: a tiny function
              compiled on the device (Triton, a C compiler, Python's headers) and cuDNN attention forward and
              backward at the trainer's shape (head dim 128), with the other backends off. One line if missing.
  bench_fast  tools/bench.py at the trainer's full size, compiled bf16, device batch 64, dense vs the seed's
              MoE, with a fast compile (no coordinate-descent tuning): train-step ms and the MoE/dense ratio,
              tokens/s, MFU, peak memory, optimizer ms, host syncs, graph breaks, recompiles, the attention
              backend; and the peak memory of one eager step of each model at device batches 64 and 32.
  tests       tests/test_cuda.py; fails if fewer than its 12 tests pass. Yields pass/fail counts.
  e2e_moe     ./run_moe.sh at full size on generated shards, compiled as bench_fast (its kernels are in the
              cache): a validation, a SIGTERM that checkpoints, --resume latest to the end. Yields the val loss
              at the start and the end, step_avg and peak memory, and that preemption and resume work.
  bench_tuned tools/bench.py with the record's settings (coordinate-descent tuning: slower compiles, faster
              kernels) in the time that is left; what it finishes refines bench_fast's figures, labelled.
  e2e_dense*  the same with ./run_dense.sh, eager (no compile): the dense launcher and its checkpoints.
  bench_b32*  tools/bench.py at device batch 32 (the seed's batch), fast compile.
Each stage's compiles are planned (printed at the start) and counted (from torch's structured trace), so a
change that adds compiles shows in the summary and, under --dry, fails tests/test_gpu_check.py.
"""
import argparse
import codecs
import datetime
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "records"))
sys.path.insert(0, str(ROOT / "tools"))
import bench as bench_tool  # noqa: E402  (one table of its figures)
from compare import fmt  # noqa: E402

# model and batch of the bench and the end-to-end runs: the same, so that the e2e runs reuse the bench's
# compiled kernels from the shared inductor cache
FULL = dict(flags=[], batch=64, sequence_length=1024, vocab_size=50304, steps=20, stop_after=8)
TINY = dict(flags=["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--dtype", "bfloat16", "--compile"],
            batch=4, sequence_length=64, vocab_size=512, steps=8, stop_after=3)


@dataclass
class Stage:
    name: str
    summary: str  # what it runs
    processes: str  # the processes it starts
    compiles: dict  # planned Dynamo frame compiles, by what compiles: {what: (count on a GPU, count under --dry)}
    cap_s: tuple  # (GPU, --dry): the most seconds it may take
    needs: list  # preflight items it cannot run without
    default: bool = True
    estimate_s: int = 0  # expected GPU seconds with a cold cache (see the README)
    best_effort: bool = False  # ended at its cap, it is partial, not failed

    def planned(self, dry: bool) -> int:
        return sum(counts[1 if dry else 0] for counts in self.compiles.values())


EXPECTED_CUDA_TESTS = 12  # tests/test_cuda.py's tests, as pytest collects them (tests/test_gpu_check.py counts)
BENCH_COMPILES = {"dense model (train graph)": (1, 1), "MoE model (train graph)": (1, 1),
                  "Newton-Schulz: dense [C,C] static, [4C,C] and [C,4C] dynamic; MoE [E,4C,C], [E,C,4C], [E,C]": (6, 6)}
STAGES = [
    Stage("preflight", "imports, tools, CUDA, disk; a tiny compile, cuDNN attention", "1 python",
          {"a tiny function on the device": (1, 1)}, (45, 90), [], estimate_s=25),
    Stage("bench_fast", "tools/bench.py, batch 64, fast compile; eager memory at 64, 32", "1 python", BENCH_COMPILES,
          (160, 360), ["torch", "CUDA", "compile"], estimate_s=130),
    Stage("tests", "pytest tests/test_cuda.py", "1 pytest + 1 spawned rank", {
        "grouped GEMM fullgraph (one static, one dynamic shape)": (2, 0), "the MoE block, fullgraph": (1, 0),
        "2-layer MoE model at full width, fullgraph": (1, 0), "Newton-Schulz as the trainer compiles it": (1, 0)},
        (100, 60), ["torch", "pytest", "CUDA", "compile"], estimate_s=90),
    Stage("e2e_moe", "./run_moe.sh: train, SIGTERM, --resume latest", "2 x (bash, torchrun, 1 worker)", {
        "part 1: eval graph (cold), train graph and 4 Newton-Schulz shapes (warm)": (6, 6),
        "part 2, the resume: the same 6, all warm": (6, 6)},
        (120, 360), ["torch", "CUDA", "compile", "bash", "setsid", "disk"], estimate_s=90),
    Stage("bench_tuned", "tools/bench.py, batch 64, the record's tuning, in the time left", "1 python",
          BENCH_COMPILES, (115, 360), ["torch", "CUDA", "compile"], estimate_s=250, best_effort=True),
    Stage("e2e_dense", "./run_dense.sh --no-compile: train, SIGTERM, --resume latest",
          "2 x (bash, torchrun, 1 worker)", {}, (40, 120), ["torch", "CUDA", "bash", "setsid", "disk"],
          default=False, estimate_s=35),
    Stage("bench_b32", "tools/bench.py, batch 32, fast compile", "1 python", {
        "dense and MoE train graphs at batch 32 (cold), Newton-Schulz (warm)": (8, 8)},
        (120, 360), ["torch", "CUDA", "compile"], default=False, estimate_s=110),
]
FAST_COMPILE = {"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "0"}  # the trainer keeps the record's tuning without it
BY_NAME = {s.name: s for s in STAGES}


class CheckFailed(Exception):
    """A stage failed; the message is the one-line reason."""


CAP_REACHED = "ended at the stage's cap"


# -----------------------------------------------------------------------------
# processes: every process a stage starts carries a tag in its environment, so the whole tree can be found
# and ended, including processes in sessions of their own (run.sh's torchrun and torchrun's workers) and
# orphans reparented to init


def tagged_pids(tag: str) -> list[int]:
    """The live processes whose environment holds GPU_CHECK_RUN=tag (from /proc: Linux)."""
    needle = f"GPU_CHECK_RUN={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:  # gone, or not ours
                pass
    return found


def end_tree(tag: str, proc: subprocess.Popen | None = None) -> None:
    """SIGKILL every process carrying the tag until none is left, and reap the direct child."""
    for _ in range(50):
        pids = tagged_pids(tag)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def run_tagged(cmd: list[str], tag: str, env: dict, output: Path, timeout: float, cwd: Path = ROOT,
               on_line=None) -> tuple[int | None, str]:
    """Run cmd with its output (stdout and stderr) streamed into a file; on_line(line, proc) sees each line.
    Returns (exit status, or None if it ran past timeout and its tree was ended; the output so far)."""
    deadline = time.monotonic() + max(0.0, timeout)
    decoder, pending, status = codecs.getincrementaldecoder("utf-8")(errors="replace"), "", None
    with open(output, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "GPU_CHECK_RUN": tag}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        fd = proc.stdout.fileno()
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([fd], [], [], 0.1)
                chunk = os.read(fd, 1 << 16) if ready else b""
                if ready and not chunk:  # end of output: every writer has exited
                    status = proc.wait()
                    break
                text = decoder.decode(chunk)
                out.write(text)
                out.flush()
                *lines, pending = (pending + text).split("\n")
                for line in lines:
                    if on_line:
                        on_line(line, proc)
        finally:
            end_tree(tag, proc)  # past the deadline, or what a finished command left behind
            proc.stdout.close()
    return status, output.read_text(errors="replace")


# -----------------------------------------------------------------------------
# the check: stages, their figures, the summary after each


def last_error_line(text: str) -> str:
    """The most telling line of a failed command's output: pytest's FAILED line, else the last error line."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for pattern in (r"^FAILED ", r"^(error|Error|\w+Error)\b", r"Error"):
        found = [l for l in lines if re.search(pattern, l)]
        if found:
            return found[0 if pattern == r"^FAILED " else -1][:300]
    return lines[-1][:300] if lines else "(no output)"


def count_compiles(trace_dir: Path) -> dict:
    """Dynamo frame compiles in a stage's structured traces (TORCH_TRACE), and the inductor graphs found in the
    cache (warm) or compiled (cold)."""
    compiles, hits, misses = 0, 0, 0
    for path in trace_dir.glob("*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("\t") or "{" not in line:
                continue  # a payload line
            try:
                event = json.loads(line[line.index("{"):])
            except ValueError:
                continue
            compiles += "dynamo_start" in event
            name = event.get("artifact", {}).get("name", "")
            hits += name == "fx_graph_cache_hit"
            misses += name == "fx_graph_cache_miss"
    return dict(compiles=compiles, inductor_graphs_from_cache=hits, inductor_graphs_compiled=misses)


class Check:
    def __init__(self, args, stages: list[Stage]):
        self.dry, self.stages = args.dry, stages
        self.out, self.work = Path(args.out), Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.budget_s = args.budget_s
        self.start = time.monotonic()
        self.tag = f"{uuid.uuid4()}"
        self.sizes = TINY if self.dry else FULL
        cache = self.work / "inductor"
        self.env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "NPROC": "1",
                    "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton"),
                    "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
                    **({"OMP_NUM_THREADS": "1"} if self.dry else {})}
        self.summary = dict(stages={s.name: dict(status="not run", planned_compiles=s.planned(self.dry),
                                                 cap_s=s.cap_s[self.dry]) for s in stages},
                            figures={}, files=[], missing=[], tag=self.tag)
        self.current: Stage | None = None

    def deadline_for(self, stage: Stage) -> float:
        """The caps, scaled to fit --budget_s, laid end to end from the start: a stage that ends early leaves
        its time to the next, and no stage can eat the time of those after it."""
        caps = [s.cap_s[self.dry] for s in self.stages]
        upto = sum(caps[:self.stages.index(stage) + 1])
        return self.start + self.budget_s * upto / sum(caps)

    def run(self, name: str, cmd: list[str], on_line=None, env: dict | None = None) -> tuple[int, str]:
        """A command of the current stage, in the repository; its output kept as <name>.out. Past the stage's
        time, its process tree is ended and the stage fails."""
        stage = self.current
        trace = self.work / "trace" / stage.name
        trace.mkdir(parents=True, exist_ok=True)
        output = self.out / f"{name}.out"
        self.keep(output.name)
        status, text = run_tagged(cmd, self.tag, {**self.env, "TORCH_TRACE": str(trace), **(env or {})}, output,
                                  self.stage_deadline - time.monotonic(), on_line=on_line)
        if status is None:
            raise CheckFailed(f"{name}: still running at {self.stage_limit_s:.0f} s (the budget is --budget_s "
                              f"{self.budget_s:g}): {CAP_REACHED}")
        return status, text

    def keep(self, name: str):
        if name not in self.summary["files"]:
            self.summary["files"].append(name)

    def write_summary(self):
        """summary.json and README.md, each replaced atomically."""
        for name, text in (("summary.json", json.dumps(self.summary, indent=2)),
                           ("README.md", summary_markdown(self.summary))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)

    def run_stage(self, stage: Stage, fn):
        entry = self.summary["stages"][stage.name]
        missing = [n for n in stage.needs if n in self.summary["missing"]]
        if missing:
            entry.update(status="skipped", reason=f"missing {', '.join(missing)} (see preflight)")
            print(f"gpu_check: {stage.name} skipped: {entry['reason']}", flush=True)
            return
        self.current, t0 = stage, time.monotonic()
        trace = self.work / "trace" / stage.name
        shutil.rmtree(trace, ignore_errors=True)  # a previous check's traces would count twice
        self.stage_deadline = self.deadline_for(stage)
        self.stage_limit_s = self.stage_deadline - t0
        entry.update(status="running")
        self.write_summary()
        try:
            self.summary["figures"][stage.name] = fn(self)
            entry["status"] = "ok"
        except CheckFailed as e:
            at_cap = str(e).endswith(CAP_REACHED)
            entry.update(status="partial" if at_cap and stage.best_effort else "FAILED", reason=str(e))
            if isinstance(self.summary["figures"].get(stage.name), dict):  # what it measured before it stopped
                self.summary["figures"][stage.name]["partial"] = True
        except Exception as e:  # a fault of the check itself: recorded, and the other stages still run
            entry.update(status="FAILED", reason=f"{type(e).__name__}: {e}"[:300])
        finally:
            entry["seconds"] = round(time.monotonic() - t0, 1)
            if trace.is_dir():
                entry.update(count_compiles(trace))
            self.current = None
            self.write_summary()
        print(f"gpu_check: {stage.name} {entry['status']} in {entry['seconds']:.0f} s"
              + (f" ({entry.get('compiles', 0)} compiles, {entry['planned_compiles']} planned)" if stage.compiles else "")
              + (f": {entry['reason']}" if entry["status"] != "ok" else ""), flush=True)


# -----------------------------------------------------------------------------
# the stages


PROBE = """import importlib, json, sys
found = {}
for module in ("torch", "numpy", "pytest"):
    try:
        found[module] = importlib.import_module(module).__version__
    except Exception:
        pass
def failure(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
if "torch" in found:
    import torch
    found["CUDA"] = torch.cuda.is_available()
    device = "cuda" if found["CUDA"] else "cpu"
    try:  # Triton on a GPU (and a C compiler and Python's headers for its launcher), C++ on a CPU
        torch.compile(lambda x: (2 * x).sin() + 1)(torch.randn(256, device=device))
        found["compile"] = f"a tiny function compiled on {device}"
    except Exception as e:
        found["compile failed"] = failure(e)
    if found["CUDA"]:  # the record's attention: cuDNN alone, at the trainer's shape, forward and backward
        try:
            for backend in ("flash", "mem_efficient", "math"):
                getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)
            q, k, v = (torch.randn(1, 6, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()
            torch.cuda.synchronize()
            found["cuDNN attention"] = "forward and backward, 6 heads of 128, 1024 tokens"
        except Exception as e:
            found["cuDNN attention failed"] = failure(e)
print(json.dumps(found))"""


def stage_preflight(check: Check) -> dict:
    """Every import and tool the stages need, and the toolchain at work, in one process; a stage that needs a
    missing one is skipped, saying so. cuDNN attention failing skips nothing (the trainer falls back, and says
    so), but fails this stage."""
    status, text = check.run("preflight", [sys.executable, "-c", PROBE])
    lines = [l for l in text.splitlines() if l.startswith("{")]
    found = json.loads(lines[-1]) if status == 0 and lines else {}
    missing = [m for m in ("torch", "numpy", "pytest") if m not in found]
    if not check.dry and not found.pop("CUDA", False):
        missing.append("CUDA")
    found.pop("CUDA", None)
    if "compile" not in found:
        missing.append("compile")
    for tool in ("bash", "setsid"):
        if shutil.which(tool):
            found[tool] = shutil.which(tool)
        else:
            missing.append(tool)
    found["nvidia-smi"] = shutil.which("nvidia-smi") or "absent (the run logs say so; nothing needs it)"
    found["torchrun on PATH"] = shutil.which("torchrun") or "absent (not needed: run.sh runs $PYTHON -m torch.distributed.run)"
    free_gb = shutil.disk_usage(check.work).free / 2 ** 30
    found["free disk under --work (GB)"] = round(free_gb, 1)
    if free_gb < (0.5 if check.dry else 10):  # two full-size MoE checkpoints of ~3 GB, caches, traces
        missing.append("disk")
    check.summary["missing"] = missing
    check.summary["figures"]["preflight"] = found
    if missing:
        why = f" ({found['compile failed']})" if "compile failed" in found else ""
        raise CheckFailed(f"missing {', '.join(missing)}{why} (free disk {free_gb:.1f} GB); the stages that need "
                          f"them are skipped")
    if "cuDNN attention failed" in found:
        raise CheckFailed(f"cuDNN attention failed ({found['cuDNN attention failed']}); the trainer falls back")
    return found


def stage_tests(check: Check) -> dict:
    """tests/test_cuda.py; its counts are tallied line by line into the summary, so a stage ended at its cap keeps
    them. It fails unless every test ran and passed: on a GPU all EXPECTED_CUDA_TESTS, under --dry all skipped."""
    counts = check.summary["figures"]["tests"] = dict(expected_passed=0 if check.dry else EXPECTED_CUDA_TESTS)

    def tally(line, proc):
        m = re.search(r" (PASSED|FAILED|SKIPPED|ERROR)\b", line)
        if m and "::" in line:
            counts[m[1].lower()] = counts.get(m[1].lower(), 0) + 1
    status, text = check.run("tests", [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                                       "tests/test_cuda.py"], on_line=tally)
    ran = sum(counts.get(k, 0) for k in ("passed", "failed", "skipped", "error"))
    if status not in (0, 5):  # 5: nothing ran, judged below
        raise CheckFailed(f"tests: {last_error_line(text)}")
    if counts.get("passed", 0) < counts["expected_passed"] or ran != EXPECTED_CUDA_TESTS:
        raise CheckFailed(f"tests: {counts.get('passed', 0)} passed of {ran} run; the plan expects "
                          f"{counts['expected_passed']} passed of {EXPECTED_CUDA_TESTS}")
    return counts


def bench_stage(batch: int, fast_compile: bool = True, memory_batches: str = ""):
    def stage(check: Check) -> dict:
        name = check.current.name
        json_path = check.out / f"{name}.json"
        sizes = check.sizes
        flags = ([*sizes["flags"], "--vocab_size", str(sizes["vocab_size"]), "--sequence_length",
                  str(sizes["sequence_length"]), "--steps", "2", "--warmup", "1"] if check.dry else ["--steps", "20"])
        cmd = [sys.executable, "tools/bench.py", "--no-layer", *flags, "--device_batch_size",
               str(batch if not check.dry else sizes["batch"]), "--json", str(json_path),
               *(["--memory_batches", memory_batches] if memory_batches else [])]
        try:
            status, text = check.run(name, cmd, env=FAST_COMPILE if fast_compile else None)
        finally:  # what it measured (bench.py writes after each model), even if it failed or hit its cap
            figures = json.loads(json_path.read_text()) if json_path.is_file() else None
            if figures:
                figures["meta"]["label"] = ("fast compile (no coordinate-descent tuning)" if fast_compile else
                                            "the record's settings (coordinate-descent tuning)")
                check.keep(json_path.name)
                check.summary["figures"][name] = figures
        if status != 0:
            raise CheckFailed(f"{name}: {last_error_line(text)}")
        moe = figures["results"]["moe"]
        if moe.get("host_syncs_per_step"):
            raise CheckFailed(f"{name}: the compiled MoE step syncs with the host {moe['host_syncs_per_step']} times")
        return figures
    return stage


def make_shards(check: Check) -> Path:
    """Full-vocabulary synthetic shards (every token id can occur): one pass of an e2e run."""
    sizes = check.sizes
    shards = check.work / f"shards_v{sizes['vocab_size']}"
    tokens_per_step = sizes["batch"] * sizes["sequence_length"]
    if not (shards / "synthetic_val_000000.bin").is_file():
        status, text = check.run(f"{check.current.name}_shards", [
            sys.executable, "data/synthetic.py", "--out", str(shards), "--vocab_size", str(sizes["vocab_size"]),
            "--train_shards", "1", "--shard_tokens", str(tokens_per_step * (sizes["steps"] + 2)),
            "--val_tokens", str(tokens_per_step + 1)])
        if status != 0:
            raise CheckFailed(f"generating shards: {last_error_line(text)}")
    return shards


def e2e_stage(script: str, extra_flags: list[str]):
    def stage(check: Check) -> dict:
        name, sizes = check.current.name, check.sizes
        shards = make_shards(check)
        log_dir = check.work / name
        shutil.rmtree(log_dir, ignore_errors=True)
        steps, batch = sizes["steps"], sizes["batch"]
        flags = [*sizes["flags"], *extra_flags, "--input_bin", str(shards / "synthetic_train_*.bin"),
                 "--input_val_bin", str(shards / "synthetic_val_*.bin"), "--vocab_size", str(sizes["vocab_size"]),
                 "--sequence_length", str(sizes["sequence_length"]), "--batch_size", str(batch),
                 "--device_batch_size", str(batch), "--val_tokens", str(batch * sizes["sequence_length"]),
                 "--num_iterations", str(steps), "--warmdown_iters", str(steps // 3), "--val_loss_every", str(steps),
                 "--log_dir", str(log_dir), "--keep_checkpoints", "1", "--seed", "1"]
        signalled = []

        def stop_when_trained(line, proc):  # SIGTERM once a step after stop_after is logged
            from compare import parse_step_line
            parsed = parse_step_line(line.strip())
            if parsed and parsed.kind == "train" and parsed.step >= sizes["stop_after"] and not signalled:
                proc.send_signal(signal.SIGTERM)  # run.sh hands it to the workers
                signalled.append(parsed.step)
        try:
            status, text = check.run(f"{name}_part1", [f"./{script}", *flags], on_line=stop_when_trained,
                                     env=FAST_COMPILE)
            if status != 0 or not signalled:
                raise CheckFailed(f"the first part exited {status} {'after' if signalled else 'before'} the "
                                  f"SIGTERM: {last_error_line(text)}")
            status, text = check.run(f"{name}_resume", [f"./{script}", *flags, "--resume", "latest"], env=FAST_COMPILE)
            if status != 0:
                raise CheckFailed(f"--resume latest failed: {last_error_line(text)}")
        finally:
            logs = list(log_dir.glob("*.txt"))
            if logs:  # the log so far, whatever happened
                shutil.copy(logs[0], check.out / f"{name}.txt")
                check.keep(f"{name}.txt")
        return check_log((check.out / f"{name}.txt").read_text(), "moe" if "moe" in script else "dense", steps,
                         cuda=not check.dry)
    return stage


def check_log(text: str, mode: str, steps: int, cuda: bool) -> dict:
    """What a healthy run's log shows; a CheckFailed naming the first thing missing."""
    from compare import parse_peak_memory, parse_router_line, parse_step_line
    lines = text.splitlines()
    parsed = [s for s in map(parse_step_line, lines) if s]
    val = {s.step: s.loss for s in parsed if s.kind == "val"}
    train = {s.step: s for s in parsed if s.kind == "train"}
    problems = []
    if 0 not in val or steps not in val:
        problems.append(f"validation lines at steps {sorted(val)}, not at 0 and {steps}")
    elif not all(v == v and abs(v) != float("inf") for v in [*val.values(), *(t.loss for t in train.values())]):
        problems.append("a non-finite loss")
    elif not val[steps] < val[0]:
        problems.append(f"the val loss did not fall ({val[0]:.4f} -> {val[steps]:.4f})")
    if sorted(train) != list(range(1, steps + 1)):
        problems.append(f"train steps {min(train, default=None)}..{max(train, default=None)} of 1..{steps}")
    if not any("stopped by SIGTERM: checkpoint" in l for l in lines) or not any(l.startswith("resume: from") for l in lines):
        problems.append("no 'stopped by SIGTERM' checkpoint and 'resume: from' line")
    if mode == "moe" and not any(map(parse_router_line, lines)):
        problems.append("no router lines")
    peak = [m for m in map(parse_peak_memory, lines) if m is not None]
    if cuda and not peak:
        problems.append("no peak-memory line")
    if problems:
        raise CheckFailed(f"e2e {mode}: " + "; ".join(problems))
    return dict(val_loss_start=val[0], val_loss_end=val[steps], step_avg_ms=train[steps].step_avg_ms,
                peak_memory_mib=max(peak) if peak else None)


RUNNERS = dict(preflight=stage_preflight, tests=stage_tests, bench_fast=bench_stage(64, memory_batches="64,32"),
               bench_tuned=bench_stage(64, fast_compile=False), bench_b32=bench_stage(32),
               e2e_moe=e2e_stage("run_moe.sh", []), e2e_dense=e2e_stage("run_dense.sh", ["--no-compile"]))


# -----------------------------------------------------------------------------
# the plan and the summary


def plan_text(stages: list[Stage], dry: bool, budget_s: float) -> str:
    lines = [f"gpu_check: the plan ({'--dry: tiny sizes on the CPU' if dry else 'one GPU, cold cache'}; "
             f"stages end at their caps, the check at {budget_s:g} s):",
             f"  {'stage':<11} {'cap':>6} {'estimate':>9}  {'processes':<34} compiles"]
    for s in stages:
        what = "; ".join(f"{n[1 if dry else 0]} {k}" for k, n in s.compiles.items() if n[1 if dry else 0]) or "none"
        lines.append(f"  {s.name:<11} {s.cap_s[dry]:>5}s {'-' if dry else str(s.estimate_s) + 's':>9}  "
                     f"{s.processes:<34} {s.planned(dry)}: {what}")
    return "\n".join(lines)


def summary_markdown(s: dict) -> str:
    lines = [f"# GPU check: {s.get('device')}", "",
             f"- device: {s.get('device')}; torch {s.get('torch')}, CUDA {s.get('cuda')}; {s.get('date')}",
             f"- command: `{s.get('command')}`", f"- result: **{s.get('result', 'running')}**", "",
             "| stage | status | time | cap | compiles (planned) | inductor graphs compiled / from cache | reason |",
             "|---|---|---|---|---|---|---|"]
    for name, st in s["stages"].items():
        lines.append(f"| {name} | {st['status']} | {fmt(st.get('seconds'), '.0f')} s | {st['cap_s']} s | "
                     f"{fmt(st.get('compiles'), 'd')} ({st['planned_compiles']}) | "
                     f"{fmt(st.get('inductor_graphs_compiled'), 'd')} / {fmt(st.get('inductor_graphs_from_cache'), 'd')} | "
                     f"{st.get('reason', '')} |")
    figures = s["figures"]
    if figures.get("tests"):
        lines += ["", "Tests (`tests/test_cuda.py`): " + ", ".join(f"{n} {k}" for k, n in figures["tests"].items())]
    for name in ("bench_fast", "bench_tuned", "bench_b32"):
        bench = figures.get(name)
        if not bench:
            continue
        meta, r = bench["meta"], bench["results"]
        done = "partial: " + ", ".join(r) + " only" if bench.get("partial") or not meta.get("complete") else ""
        lines += ["", f"## {name}: {meta.get('label', '')}{' (' + done + ')' if done else ''}", "",
                  f"{meta['size']} size, {meta['dtype']}, {'compiled' if meta['compile'] else 'eager'}, attention "
                  f"{meta.get('attention')}, {meta['device_batch_size']} x {meta['sequence_length']} tokens per step: "
                  f"`{meta['command']}`", "", bench_tool.table(r, meta)]
        lines += ["", f"MoE/dense train step: {fmt(bench['ratios'].get('step_ms'), '.3f')}x (the MoE wins in wall-clock "
                      f"below 1.125x; the target is 1.05x). Dense: {fmt(r.get('dense', {}).get('tokens_per_s'), ',.0f')} "
                      f"tokens/s on this device; the record ran ~462,000 tokens/s per H100."]
    runs = {k: v for k, v in figures.items() if k.startswith("e2e")}
    if runs:
        lines += ["", "## End to end (one process: train, SIGTERM, `--resume latest`)", "",
                  "| run | val loss at 0 | val loss at the end | step_avg (ms) | peak memory (MiB) |", "|---|---|---|---|---|"]
        for mode, f in runs.items():
            lines.append(f"| {mode} | {f['val_loss_start']:.4f} | {f['val_loss_end']:.4f} | {f['step_avg_ms']:.2f} | "
                         f"{fmt(f['peak_memory_mib'], 'd')} |")
    if figures.get("preflight"):
        lines += ["", "Preflight: " + "; ".join(f"{k}: {v}" for k, v in figures["preflight"].items())]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in s["files"]), ""]
    return "\n".join(lines)


def device_description(dry: bool) -> tuple[str, str | None, str]:
    import torch
    if torch.cuda.is_available() and not dry:
        return torch.cuda.get_device_name(0), torch.version.cuda, torch.__version__
    return ("CPU (dry run)" if dry else "CPU"), torch.version.cuda, torch.__version__


def choose_stages(text: str | None, skip: str, parser) -> list[Stage]:
    names = [s.name for s in STAGES if s.default] if text is None else [n for n in text.split(",") if n]
    names = ["preflight"] + [n for n in names if n != "preflight"]
    unknown = [n for n in names + [n for n in skip.split(",") if n] if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; the stages are {[s.name for s in STAGES]}")
    skipped = set(skip.split(","))
    return [s for s in STAGES if s.name in names and s.name not in skipped]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the results folder (default: records/<date>_<device>/)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "modded-nanogpt-moe-gpu-check"),
                        help="shards, run folders, traces and the shared inductor cache (not results)")
    parser.add_argument("--stages", help="comma-separated stages to run (default: the starred ones are left out)")
    parser.add_argument("--skip", default="", help="comma-separated stages to leave out")
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU: check the check, not the GPU")
    parser.add_argument("--budget_s", type=float, help="end the check after this many seconds (default: the sum "
                        "of the stages' caps, 420 on a GPU)")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    stages = choose_stages(args.stages, args.skip, parser)
    if args.budget_s is None:
        args.budget_s = sum(s.cap_s[args.dry] for s in stages)
    print(plan_text(stages, args.dry, args.budget_s), flush=True)
    if args.plan:
        return 0
    import torch
    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run it on a GPU machine, or with --dry to check the check on a CPU",
              file=sys.stderr)
        return 2
    device, cuda_version, torch_version = device_description(args.dry)
    date = datetime.date.today().isoformat()
    if args.out is None:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", device.removeprefix("NVIDIA ")).strip("_")
        args.out = str(ROOT / "records" / f"{date}_{slug}")
    check = Check(args, stages)
    check.summary.update(device=device, torch=torch_version, cuda=cuda_version, date=date, budget_s=args.budget_s,
                         command=" ".join(["python", "tools/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]))
    print(f"gpu_check: {device}, torch {torch_version}, CUDA {cuda_version}; results into {check.out}", flush=True)

    def interrupted(signum, frame):  # end the running stage's processes, keep what was learned, leave
        if check.current:
            check.summary["stages"][check.current.name].update(status="interrupted",
                                                              reason=f"{signal.Signals(signum).name} to gpu_check")
        end_tree(check.tag)
        check.summary["result"] = f"interrupted by {signal.Signals(signum).name}"
        check.write_summary()
        print(f"gpu_check: interrupted by {signal.Signals(signum).name}; results so far in {check.out}",
              file=sys.stderr)
        os._exit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupted)

    check.write_summary()
    for stage in stages:
        check.run_stage(stage, RUNNERS[stage.name])
    failed = [f"{n}: {st['reason']}" for n, st in check.summary["stages"].items() if st["status"] not in ("ok",)]
    check.summary["result"] = ("failed: " + " | ".join(failed)) if failed else "all stages passed"
    check.keep("README.md")
    check.keep("summary.json")
    check.write_summary()
    print(summary_markdown(check.summary))
    if failed:
        print(f"gpu_check: FAILED: {failed[0]}" + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

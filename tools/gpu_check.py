"""
The GPU proof in one command, sized for one call of at most 10 minutes on one H100/H200 with a cold compile
cache (540 s by default), that keeps every figure it earns: what only a GPU gives comes first, each stage's
results are written the moment the stage ends (and on SIGTERM or Ctrl-C), a failed stage does not stop the
stages after it, and a stage that overruns its time is ended with its whole process tree. It installs
nothing and needs no network: it runs on the torch the machine has (2.9 or later).

    python tools/gpu_check.py                        # the default stages, into records/<date>_<device>/
    python tools/gpu_check.py --out DIR --stages tests,bench_fast,bench_b32
    python tools/gpu_check.py --dry                  # the same stages at tiny sizes on the CPU (the tests run this)

--out holds three files: summary.json (every figure), README.md (the same as tables) and logs.tar.gz (each
command's output, the bench's JSON, the e2e run's log). After each stage one line gives its status and key
figures, and the output ends with a recap of every stage in under 4000 characters, so that the end of the
output alone carries the result if no file comes back.

Stages (in order; * = not run unless named in --stages). Estimates are for one H100/H200, a cold compile cache
and torch 2.9-2.13, read off the code (never measured: no GPU has run this yet); each cap leaves a margin:
  preflight   (cap 45 s, estimate 30: python and torch imports ~8 s, CUDA init ~3 s, a Triton compile ~15 s)
              every import and tool the stages need, CUDA, the driver, free disk, and the toolchain at work: a
              tiny function compiled on the device, cuDNN attention forward and backward at the trainer's
              shape (head dim 128) with the other backends off, and one bf16 grouped GEMM forward and backward
              with odd and empty groups. One line if missing.
  bench_fast  (cap 240 s, estimate 200: three full-size train graphs at ~50 s each with a fast compile, three
              MLP layers at ~5 s, the Newton-Schulz shapes, ~20 s of timing) tools/bench.py at the trainer's
              full size, compiled bf16, device batch 64, with a fast compile (no coordinate-descent tuning):
              dense, the seed's MoE (E4 top-1) and E16 top-3 H768 + a shared expert of 768. Each MoE/dense
              ratio three ways (train step; forward and backward; a projection for 8 ranks), the MLP layer
              alone, tokens/s, MFU, peak memory, optimizer ms, host syncs, graph breaks, recompiles.
  tests       (cap 130 s, estimate 105: two pytest processes ~12 s each to start, 7 compiles ~10 s each, one
              spawned NCCL rank ~15 s) tests/test_cuda.py, its grouped-GEMM tests in a process of their own (a
              device-side assert there cannot take the others down), then the rest; all 12 must pass.
  e2e_moe     (cap 125 s, estimate 100: two launches of bash, torchrun and a worker ~15 s each, the bench's
              kernels from the cache with dynamo's tracing ~20 s each, the cold eval graph ~15 s, 40 steps)
              ./run_moe.sh at full size on generated shards: 20 steps, a SIGTERM that checkpoints, --resume
              latest to step 42. Each part times about 10 steps; the first loss after the resume must lie within
              the spread of the last ones before the stop, at the next step.
  bench_tuned* tools/bench.py with the record's settings (coordinate-descent tuning: slower compiles, faster
              kernels), best effort: cut at its cap it is reported as cut and does not fail the check.
  e2e_dense*  the same as e2e_moe with ./run_dense.sh, eager (no compile): the dense launcher and its checkpoints.
  bench_b32*  tools/bench.py at device batch 32 (the seed's batch), fast compile, and the peak memory of one
              eager step of each model at device batches 64 and 32.
Each stage's compiles are planned (printed at the start) and counted (from torch's structured trace), so a
change that adds compiles shows in the summary and, under --dry, fails tests/test_gpu_check.py.
"""
import argparse
import codecs
import datetime
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import bench as bench_tool  # (one table of its figures)
from compare import fmt, markdown
from repo_root import ROOT

# model and batch of the bench and the end-to-end runs: the same, so that the e2e runs reuse the bench's
# compiled kernels from the shared inductor cache
# (e2e: the clock leaves out a session's first 10 steps, so about stop_after - 10 and steps - stop_after - 10 are
# the steps each part times: the run stops at the first step boundary after the SIGTERM, a step or two later)
FULL = dict(flags=[], batch=64, sequence_length=1024, vocab_size=50304, n_embd=768, steps=42, stop_after=20)
TINY_FLAGS = str(ROOT / "flags" / "tiny.txt")  # the tiny CPU size, in bf16 and compiled as on a GPU
_tiny = bench_tool.Hyperparameters(**vars(bench_tool.build_parser().parse_args(["@" + TINY_FLAGS])))
TINY = dict(flags=["@" + TINY_FLAGS, "--dtype", "bfloat16", "--compile"], batch=_tiny.device_batch_size,
            sequence_length=_tiny.sequence_length, vocab_size=_tiny.vocab_size, n_embd=_tiny.n_embd, steps=34,
            stop_after=15)
MIN_TIMED_STEPS = 5  # a part of the e2e run must time at least this many steps for its step_avg to mean much


def finegrained_moe(n_embd: int) -> str:
    """The design that wins per token in the CPU studies, at this width: 16 experts of width n_embd, top-3,
    and a shared expert of n_embd (active MLP width 4 x n_embd, the dense MLP's)."""
    return (f"--num_experts 16 --top_k 3 --expert_hidden {n_embd} --shared_expert_hidden {n_embd} "
            f"--aux_loss_coef 0.01")


@dataclass
class Stage:
    name: str
    summary: str  # what it runs
    processes: str  # the processes it starts
    compiles: dict  # planned Dynamo frame compiles, by what compiles: {what: (count on a GPU, count under --dry)}
    cap_s: tuple  # (GPU, --dry): the most seconds it may take
    needs: list  # preflight items it cannot run without
    default: bool = True
    estimate_s: int = 0  # expected GPU seconds with a cold cache (the module's docstring says from what)
    best_effort: bool = False  # ended at its cap, it is cut, and the check's exit status does not count it

    def planned(self, dry: bool) -> int:
        return sum(counts[1 if dry else 0] for counts in self.compiles.values())


EXPECTED_CUDA_TESTS = 12  # tests/test_cuda.py's tests, as pytest collects them (tests/test_gpu_check.py counts)
GROUPED_GEMM_TESTS = "grouped_gemm"  # the -k expression of the tests that run in a process of their own
GROUPED_GEMM_COMPILED_CASES = 4  # its compiled cases; the fixture's dynamo.reset() makes each a fresh compile
BENCH_COMPILES = {"dense, seed MoE and E16 MoE models (train graphs)": (3, 3),
                  "their MLP layers alone": (3, 3),
                  "Newton-Schulz: [C,C] static, [4C,C] and [C,4C] dynamic; [E,4C,C], [E,C,4C], [E,C]; "
                  "E16's [E,C,C]": (7, 7)}
STAGES = [
    Stage("preflight", "imports, tools, CUDA, driver, disk; a tiny compile, cuDNN attention, a grouped GEMM",
          "1 python", {"a tiny function on the device": (1, 1)}, (45, 90), [], estimate_s=30),
    Stage("bench_fast", "tools/bench.py, batch 64, fast compile: dense, E4 top-1, E16 top-3 + shared", "1 python",
          BENCH_COMPILES, (240, 420), ["torch", "CUDA", "compile"], estimate_s=200),
    Stage("tests", "pytest tests/test_cuda.py: the grouped GEMM alone, then the rest", "2 pytest + 1 spawned rank", {
        "grouped GEMM, each compiled case afresh (the fixture resets dynamo)": (GROUPED_GEMM_COMPILED_CASES, 0),
        "the MoE block, fullgraph": (1, 0), "2-layer MoE model at full width, fullgraph": (1, 0),
        "Newton-Schulz as the trainer compiles it": (1, 0)},
        (130, 90), ["torch", "pytest", "CUDA", "compile"], estimate_s=105),
    Stage("e2e_moe", "./run_moe.sh: train, SIGTERM, --resume latest", "2 x (bash, torchrun, 1 worker)", {
        "part 1: eval graph (cold), train graph and 4 Newton-Schulz shapes (warm)": (6, 6),
        "part 2, the resume: the same 6, all warm": (6, 6)},
        (125, 360), ["torch", "CUDA", "compile", "bash", "setsid", "disk"], estimate_s=100),
    Stage("bench_tuned", "tools/bench.py, batch 64, the record's tuning, best effort", "1 python",
          BENCH_COMPILES, (300, 420), ["torch", "CUDA", "compile"], default=False, estimate_s=400, best_effort=True),
    Stage("e2e_dense", "./run_dense.sh --no-compile: train, SIGTERM, --resume latest",
          "2 x (bash, torchrun, 1 worker)", {}, (60, 120), ["torch", "CUDA", "bash", "setsid", "disk"],
          default=False, estimate_s=45),
    Stage("bench_b32", "tools/bench.py, batch 32, fast compile; eager memory at 64, 32", "1 python", {
        "the three models at batch 32 and their layers (cold), Newton-Schulz (warm)": (13, 13)},
        (240, 420), ["torch", "CUDA", "compile"], default=False, estimate_s=180),
]
FAST_COMPILE = {"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "0"}  # the trainer keeps the record's tuning without it
BY_NAME = {s.name: s for s in STAGES}


class CheckFailed(Exception):
    """A stage failed; the message is the one-line reason."""


CAP_REACHED = "ended at the stage's cap"
CUT = "cut"  # the status of a best-effort stage ended at its cap
RESULT_FILES = ("summary.json", "README.md", "logs.tar.gz")  # all that --out holds


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
        self.logs = self.work / "logs"  # every command's output, the bench's JSON, the e2e logs: logs.tar.gz
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
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
                            figures={}, files=list(RESULT_FILES), missing=[], tag=self.tag)
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
        output = self.logs / f"{name}.out"
        status, text = run_tagged(cmd, self.tag, {**self.env, "TORCH_TRACE": str(trace), **(env or {})}, output,
                                  self.stage_deadline - time.monotonic(), on_line=on_line)
        if status is None:
            raise CheckFailed(f"{name}: still running at {self.stage_limit_s:.0f} s (the budget is --budget_s "
                              f"{self.budget_s:g}): {CAP_REACHED}")
        return status, text

    def write_summary(self):
        """summary.json, README.md and logs.tar.gz (the logs folder), each replaced atomically."""
        for name, text in (("summary.json", json.dumps(self.summary, indent=2)),
                           ("README.md", summary_markdown(self.summary))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)
        tmp = self.out / ".logs.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as archive:
            archive.add(self.logs, arcname="logs")
        os.replace(tmp, self.out / "logs.tar.gz")

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
            entry.update(status=CUT if at_cap and stage.best_effort else "FAILED", reason=str(e))
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
        print(stage_line(stage.name, entry, self.summary["figures"].get(stage.name)), flush=True)


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
    try:  # the MoE's grouped GEMM (bf16 on a GPU) forward and backward, with empty and odd groups
        from train_gpt2 import expert_matmul
        dtype = torch.bfloat16 if found["CUDA"] else torch.float32
        counts = [0, 1, 7, 1000]
        x = torch.randn(sum(counts), 768, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(len(counts), 3072, 768, device=device) / 768 ** 0.5).to(dtype).requires_grad_()
        offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
        expert_matmul(x, w, offs).float().square().mean().backward()
        if found["CUDA"]:
            torch.cuda.synchronize()  # a device-side assert surfaces here
        assert torch.isfinite(w.grad).all(), "a weight gradient that is not finite"
        assert torch.count_nonzero(w.grad[0]) == 0, "the empty group's weight gradient is not zero"
        found["grouped GEMM"] = f"{str(dtype)[6:]} forward and backward on {device}, groups of 0, 1, 7, 1000 rows"
    except Exception as e:
        found["grouped GEMM failed"] = failure(e)
print(json.dumps(found))"""


def driver_version() -> str | None:
    """The NVIDIA driver's version: nvidia-smi's, else the kernel module's."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        return re.search(r"Kernel Module\s+(\S+)", Path("/proc/driver/nvidia/version").read_text())[1]
    except (OSError, TypeError):
        return None


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
    for what, consequence in (("cuDNN attention", "the trainer falls back"),
                              ("grouped GEMM", "the MoE stages will fail")):
        if f"{what} failed" in found:
            raise CheckFailed(f"{what} failed ({found[f'{what} failed']}); {consequence}")
    return found


def stage_tests(check: Check) -> dict:
    """tests/test_cuda.py in two processes, the grouped-GEMM tests first and alone (a device-side assert leaves its
    process's CUDA context unusable); the counts are tallied line by line into the summary, so a stage ended at its
    cap keeps them. It fails unless every test ran and passed: on a GPU all EXPECTED_CUDA_TESTS, under --dry all
    skipped."""
    counts = check.summary["figures"]["tests"] = dict(expected_passed=0 if check.dry else EXPECTED_CUDA_TESTS)

    def tally(line, proc):
        m = re.search(r" (PASSED|FAILED|SKIPPED|ERROR)\b", line)
        if m and "::" in line:
            counts[m[1].lower()] = counts.get(m[1].lower(), 0) + 1
    failures = []
    for name, selection in (("tests_grouped_gemm", GROUPED_GEMM_TESTS), ("tests_rest", f"not {GROUPED_GEMM_TESTS}")):
        status, text = check.run(name, [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                                        "tests/test_cuda.py", "-k", selection], on_line=tally)
        if status not in (0, 5):  # 5: nothing ran, judged below
            failures.append(f"{name}: {last_error_line(text)}")
    ran = sum(counts.get(k, 0) for k in ("passed", "failed", "skipped", "error"))
    if failures:
        raise CheckFailed("tests: " + " | ".join(failures))
    if counts.get("passed", 0) < counts["expected_passed"] or ran != EXPECTED_CUDA_TESTS:
        raise CheckFailed(f"tests: {counts.get('passed', 0)} passed of {ran} run; the plan expects "
                          f"{counts['expected_passed']} passed of {EXPECTED_CUDA_TESTS}")
    return counts


def bench_stage(batch: int, fast_compile: bool = True, memory_batches: str = ""):
    def stage(check: Check) -> dict:
        name, sizes = check.current.name, check.sizes
        json_path = check.logs / f"{name}.json"
        flags = ([*sizes["flags"], "--vocab_size", str(sizes["vocab_size"]), "--sequence_length",
                  str(sizes["sequence_length"]), "--steps", "2", "--warmup", "1"] if check.dry else ["--steps", "20"])
        cmd = [sys.executable, "tools/bench.py", *flags, "--device_batch_size",
               str(batch if not check.dry else sizes["batch"]), "--json", str(json_path),
               "--extra_moe", finegrained_moe(sizes["n_embd"]),
               *(["--memory_batches", memory_batches] if memory_batches else [])]
        status, text = None, ""
        try:
            status, text = check.run(name, cmd, env=FAST_COMPILE if fast_compile else None)
        finally:  # what it measured (bench.py writes each model's figures at once), even if it failed or was cut
            figures = json.loads(json_path.read_text()) if json_path.is_file() else None
            if figures:
                figures["meta"]["label"] = ("fast compile (no coordinate-descent tuning)" if fast_compile else
                                            "the record's settings (coordinate-descent tuning)")
                check.summary["figures"][name] = figures
        if status != 0:
            raise CheckFailed(f"{name}: {last_error_line(text)}")
        syncs = {m: r["host_syncs_per_step"] for m, r in figures["results"].items() if r.get("host_syncs_per_step")}
        if syncs:
            raise CheckFailed(f"{name}: the compiled step syncs with the host: {syncs} times a step")
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
                shutil.copy(logs[0], check.logs / f"{name}.txt")
        return check_log((check.logs / f"{name}.txt").read_text(), "moe" if "moe" in script else "dense", steps,
                         cuda=not check.dry, vocab_size=sizes["vocab_size"])
    return stage


def check_log(text: str, mode: str, steps: int, cuda: bool, vocab_size: int = 50304) -> dict:
    """What a healthy run's log shows, a resume that went on from its checkpoint included; a CheckFailed naming
    everything missing."""
    from compare import parse_peak_memory, parse_router_line, parse_step_line
    lines = text.splitlines()
    stop = next((i for i, l in enumerate(lines) if "stopped by SIGTERM: checkpoint" in l), None)
    resume = next((i for i, l in enumerate(lines) if l.startswith("resume: from")), None)
    before = [s for s in map(parse_step_line, lines[:stop]) if s] if stop is not None else []
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
    figures = {}
    if stop is None or resume is None or resume < stop:
        problems.append("no 'stopped by SIGTERM' checkpoint followed by a 'resume: from' line")
    else:
        stopped_at = int(re.match(r"step:(\d+)/", lines[stop])[1])
        resumed_at = int(re.search(r" at step (\d+)$", lines[resume])[1])
        first = next((s for s in map(parse_step_line, lines[resume:]) if s and s.kind == "train"), None)
        last = [s.loss for s in before if s.kind == "train"][-5:]
        if resumed_at != stopped_at or first is None or first.step != resumed_at + 1:
            problems.append(f"stopped at step {stopped_at}, resumed at {resumed_at}, went on at step "
                            f"{first and first.step}: the step count did not continue from the checkpoint")
        elif len(last) < 2:
            problems.append("fewer than 2 train losses before the stop")
        else:  # a resume that started over would be back near ln(V)
            low, high = min(last), max(last)
            width = max(high - low, 0.01)
            if not low - width <= first.loss <= high + width:
                problems.append(f"the first loss after the resume, {first.loss:.4f}, is outside the spread of the "
                                f"last before the stop ({low:.4f}..{high:.4f}, widened by {width:.4f}); "
                                f"ln(V) = {math.log(vocab_size):.4f}")
            figures.update(resumed_at=resumed_at, losses_before_stop=last, first_loss_after_resume=first.loss)
        timed = [stopped_at - 10, steps - resumed_at - 10]  # a session's first 10 steps are off the clock
        part1 = train[stopped_at].step_avg_ms if stopped_at in train else float("nan")
        if min(timed) < MIN_TIMED_STEPS or not math.isfinite(part1):
            problems.append(f"the two parts time {timed[0]} and {timed[1]} steps (fewer than {MIN_TIMED_STEPS}), "
                            f"step_avg {part1} ms at the stop")
        figures.update(step_avg_ms_part1=part1, timed_steps=timed)
    if mode == "moe" and not any(map(parse_router_line, lines)):
        problems.append("no router lines")
    peak = [m for m in map(parse_peak_memory, lines) if m is not None]
    if cuda and not peak:
        problems.append("no peak-memory line")
    if problems:
        raise CheckFailed(f"e2e {mode}: " + "; ".join(problems))
    return dict(val_loss_start=val[0], val_loss_end=val[steps], step_avg_ms=train[steps].step_avg_ms,
                peak_memory_mib=max(peak) if peak else None, **figures)


RUNNERS = dict(preflight=stage_preflight, tests=stage_tests, bench_fast=bench_stage(64),
               bench_tuned=bench_stage(64, fast_compile=False), bench_b32=bench_stage(32, memory_batches="64,32"),
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
             f"- device: {s.get('device')}; torch {s.get('torch')}, CUDA {s.get('cuda')}, driver {s.get('driver')}; "
             f"{s.get('date')}",
             f"- command: `{s.get('command')}`", f"- result: **{s.get('result', 'running')}**", "",
             markdown(["stage", "status", "time", "cap", "compiles (planned)", "inductor graphs compiled / from cache",
                       "reason"],
                      [[name, st["status"], f"{fmt(st.get('seconds'), '.0f')} s", f"{st['cap_s']} s",
                        f"{fmt(st.get('compiles'), 'd')} ({st['planned_compiles']})",
                        f"{fmt(st.get('inductor_graphs_compiled'), 'd')} / "
                        f"{fmt(st.get('inductor_graphs_from_cache'), 'd')}", st.get("reason", "")]
                       for name, st in s["stages"].items()])]
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
        lines += [""] + [f"- {line}" for line in bench_ratio_lines(bench)] + [
            "", f"The MoE wins in wall-clock below 1.125x dense's step (the seed's 4000 steps against 4500). The "
                f"8-rank projection: forward and backward, Adam, and Muon's time on this GPU times the share of "
                f"the Newton-Schulz FLOPs that the busiest of 8 ranks owns; the all-reduces are left out. Dense: "
                f"{fmt(r.get('dense', {}).get('tokens_per_s'), ',.0f')} tokens/s on this device; the record ran "
                f"~462,000 tokens/s per H100."]
    runs = {k: v for k, v in figures.items() if k.startswith("e2e")}
    if runs:
        header = ["run", "val loss at 0", "val loss at the end", "step_avg at the stop / end (ms)", "resumed at",
                  "first loss after it (last 5 before)", "peak memory (MiB)"]
        lines += ["", "## End to end (one process: train, SIGTERM, `--resume latest`)", "", markdown(header, [
            [mode, f"{f['val_loss_start']:.4f}", f"{f['val_loss_end']:.4f}",
             f"{fmt(f.get('step_avg_ms_part1'), '.2f')} / {f['step_avg_ms']:.2f}", str(f.get("resumed_at")),
             f"{fmt(f.get('first_loss_after_resume'), '.3f')} ("
             + ", ".join(f"{x:.3f}" for x in f.get("losses_before_stop", [])) + ")", fmt(f["peak_memory_mib"], "d")]
            for mode, f in runs.items()])]
    if figures.get("preflight"):
        lines += ["", "Preflight: " + "; ".join(f"{k}: {v}" for k, v in figures["preflight"].items())]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in s["files"]), ""]
    return "\n".join(lines)


def bench_ratio_lines(bench: dict) -> list[str]:
    """One line per MoE design: its train step in ms and its ratios to dense's three ways."""
    dense = bench["results"].get("dense", {})
    lines = [f"dense: train step {fmt(dense.get('step_ms'), '.1f')} ms"]
    for mode, ratio in bench.get("ratios", {}).items():
        r = bench["results"][mode]
        lines.append(f"{mode}: train step {fmt(r.get('step_ms'), '.1f')} ms; MoE/dense {fmt(ratio.get('step_ms'), '.3f')}x "
                     f"the step, {fmt(ratio.get('fwd_bwd_ms'), '.3f')}x forward+backward, "
                     f"{fmt(ratio.get('projected_8_rank_ms'), '.3f')}x projected on 8 ranks")
    return lines


def stage_line(name: str, entry: dict, figures) -> str:
    """One line (a short block for a bench) with a stage's status, time, compiles and key figures."""
    head = (f"gpu_check: {name} {entry['status']} in {fmt(entry.get('seconds'), '.0f')} s"
            + (f" ({entry.get('compiles', 0)} compiles, {entry['planned_compiles']} planned)"
               if entry.get("planned_compiles") else "")
            + (f": {entry['reason']}" if entry.get("reason") else ""))
    if not isinstance(figures, dict):
        return head
    if name.startswith("bench") and "results" in figures:
        return "\n".join([head, *(f"  {line}" for line in bench_ratio_lines(figures))])
    if name == "tests":
        return f"{head}; " + ", ".join(f"{n} {k}" for k, n in figures.items() if isinstance(n, int) and n is not True)
    if name.startswith("e2e"):
        return (f"{head}; val {figures['val_loss_start']:.3f} -> {figures['val_loss_end']:.3f}, step_avg "
                f"{fmt(figures.get('step_avg_ms_part1'), '.1f')} / {figures['step_avg_ms']:.1f} ms, resumed at "
                f"{figures.get('resumed_at')} with loss {fmt(figures.get('first_loss_after_resume'), '.3f')}")
    if name == "preflight":
        return f"{head}; " + ", ".join(k for k in figures if k in ("compile", "cuDNN attention", "grouped GEMM"))
    return head


def recap(summary: dict) -> str:
    """Every stage's line, the versions and the result: the end of the output, under 4000 characters."""
    lines = ["gpu_check: recap", f"  {summary.get('device')}; torch {summary.get('torch')}, CUDA "
             f"{summary.get('cuda')}, driver {summary.get('driver')}"]
    lines += [stage_line(name, entry, summary["figures"].get(name)) for name, entry in summary["stages"].items()]
    lines.append(f"gpu_check: {summary.get('result')}")
    text = "\n".join(line[:400] for line in lines)
    return text[-3900:]


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


def verdict(summary: dict) -> tuple[str, list[str]]:
    """The check's result line and the stages that fail it: every stage not ok, except a best-effort one cut."""
    failed = [n for n, st in summary["stages"].items() if st["status"] not in ("ok", CUT)]
    cut = [n for n, st in summary["stages"].items() if st["status"] == CUT]
    reasons = " | ".join(f"{n}: {summary['stages'][n].get('reason')}" for n in failed)
    return ((f"failed: {reasons}" if failed else "all stages passed")
            + (f" ({', '.join(cut)} cut at its cap: best effort, not counted)" if cut else "")), failed


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
    check.summary.update(device=device, torch=torch_version, cuda=cuda_version, driver=driver_version(), date=date,
                         budget_s=args.budget_s,
                         command=" ".join(["python", "tools/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]))
    print(f"gpu_check: {device}, torch {torch_version}, CUDA {cuda_version}; results into {check.out}", flush=True)

    def interrupted(signum, frame):  # end the running stage's processes, keep what was learned, leave
        if check.current:
            check.summary["stages"][check.current.name].update(status="interrupted",
                                                              reason=f"{signal.Signals(signum).name} to gpu_check")
        end_tree(check.tag)
        check.summary["result"] = f"interrupted by {signal.Signals(signum).name}"
        check.write_summary()
        print(recap(check.summary), flush=True)
        print(f"gpu_check: interrupted by {signal.Signals(signum).name}; results so far in {check.out}",
              file=sys.stderr)
        os._exit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupted)

    check.write_summary()
    for stage in stages:
        check.run_stage(stage, RUNNERS[stage.name])
    check.summary["result"], failed = verdict(check.summary)
    check.write_summary()
    print(summary_markdown(check.summary))
    print(recap(check.summary))
    if failed:
        print(f"gpu_check: FAILED: {failed[0]}: {check.summary['stages'][failed[0]].get('reason')}"
              + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

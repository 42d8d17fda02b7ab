"""gpu_check.py: its --dry path runs every default stage on the CPU and counts their compiles against the plan,
so the check cannot rot (or quietly grow) while no GPU is at hand; its process control and summaries."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import ROOT

import gpu_check  # noqa: E402


def without_torchrun_path() -> str:
    """PATH without any folder that holds a torchrun (the venv's bin, say): the check must not need one."""
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if d and not os.path.exists(os.path.join(d, "torchrun")))


def run_check(*args, timeout=900, env=None, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env, **popen)


def archived(out, name):
    """A file of logs.tar.gz, as text."""
    with tarfile.open(out / "logs.tar.gz") as archive:
        return archive.extractfile(f"logs/{name}").read().decode()


def test_dry_run_passes_every_stage_with_the_planned_compiles_and_no_torchrun_on_path(tmp_path):
    path = without_torchrun_path()
    assert shutil.which("torchrun", path=path) is None and shutil.which("setsid", path=path)
    out, work = tmp_path / "out", tmp_path / "work"
    result = run_check("--dry", "--out", str(out), "--work", str(work), env={"PATH": path})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.startswith("gpu_check: the plan") and f"results into {out}" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"] == "all stages passed"
    assert [s.name for s in gpu_check.STAGES if s.default] == list(summary["stages"])
    for name, stage in summary["stages"].items():
        assert stage["status"] == "ok", (name, stage)
        # the compiles the plan promised, no more: a change that adds compiles to the GPU run fails here
        assert stage.get("compiles", 0) == stage["planned_compiles"], (name, stage)
    assert summary["stages"]["bench_fast"]["compiles"] > 0 and summary["stages"]["e2e_moe"]["compiles"] > 0
    # the e2e runs found the bench's compiled graphs in the shared cache: only the eval graph is new
    assert summary["stages"]["e2e_moe"]["inductor_graphs_compiled"] == 1
    # tests/test_cuda.py in two processes, every test skipped without CUDA, which is what --dry expects
    assert summary["figures"]["tests"] == dict(expected_passed=0, skipped=gpu_check.EXPECTED_CUDA_TESTS)
    preflight = summary["figures"]["preflight"]
    assert preflight["compile"] == "a tiny function compiled on cpu"
    assert preflight["grouped GEMM"] == "float32 forward and backward on cpu, groups of 0, 1, 7, 1000 rows"
    bench = summary["figures"]["bench_fast"]
    assert bench["meta"]["label"].startswith("fast compile") and bench["meta"]["complete"]
    assert bench["meta"]["models"] == ["dense", "moe", "E16 top-3 H64 S64"]
    assert bench["meta"]["compile"] and bench["meta"]["dtype"] == "bfloat16"
    for mode, r in bench["results"].items():
        assert r["step_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["projected_8_rank_ms"] > 0 and r["layer_ms"] > 0
        assert r["graph_breaks"] == 0 and r["recompiles"] == 0, mode
    assert set(bench["ratios"]) == {"moe", "E16 top-3 H64 S64"}
    figures = summary["figures"]["e2e_moe"]
    assert figures["val_loss_end"] < figures["val_loss_start"]
    assert figures["resumed_at"] >= 15 and min(figures["timed_steps"]) >= gpu_check.MIN_TIMED_STEPS
    assert figures["step_avg_ms_part1"] > 0
    # the results travel as three files, none in a folder
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.RESULT_FILES) == sorted(summary["files"])
    log = archived(out, "e2e_moe.txt")
    assert "stopped by SIGTERM: checkpoint" in log and "resume: from" in log and " router layer:" in log
    assert json.loads(archived(out, "bench_fast.json"))["meta"]["complete"]
    assert "test_cuda.py" in archived(out, "tests_grouped_gemm.out") + archived(out, "tests_rest.out")
    readme = (out / "README.md").read_text()
    assert readme.startswith("# GPU check: CPU (dry run)") and "| e2e_moe | ok |" in readme
    assert "| train step (ms, median) |" in readme and "## End to end" in readme
    assert "| projected 8-rank step (ms) |" in readme and "E16 top-3 H64 S64: train step" in readme
    # the output's last 4000 characters alone carry every stage's status and the bench's step times
    tail = result.stdout[-4000:]
    for name in summary["stages"]:
        assert f"gpu_check: {name} ok in " in tail, name
    for mode, r in bench["results"].items():
        assert f"{mode}: train step {r['step_ms']:.1f} ms" in tail, mode
    assert tail.rstrip().endswith("gpu_check: all stages passed")


def test_the_plan_names_each_stage_its_processes_and_compiles():
    result = run_check("--plan")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    for stage in gpu_check.STAGES:
        if stage.default:
            (row,) = [l for l in lines if l.split()[:1] == [stage.name]]
            assert f"{stage.cap_s[0]}s" in row and f" {stage.planned(dry=False)}: " in row
    default = [s for s in gpu_check.STAGES if s.default]
    assert sum(s.cap_s[0] for s in default) <= 540  # one call of 600 s, with a minute to spare
    # a stage the check must pass is planned within its cap with a margin; nothing best-effort is in the default
    assert all(s.cap_s[0] >= s.estimate_s + max(15, 0.1 * s.estimate_s) for s in default)
    assert not any(s.best_effort for s in default)
    assert "the check at 540 s" in lines[0]
    assert [s.name for s in default][:2] == ["preflight", "bench_fast"]  # the figures only a GPU gives, first


def collect(*selection):
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_cuda.py", *selection],
                            cwd=ROOT, capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_the_plan_expects_every_test_of_test_cuda_and_counts_its_compiles():
    every = collect()
    assert len(every) == gpu_check.EXPECTED_CUDA_TESTS
    grouped, rest = collect("-k", gpu_check.GROUPED_GEMM_TESTS), collect("-k", f"not {gpu_check.GROUPED_GEMM_TESTS}")
    assert sorted(grouped + rest) == sorted(every) and grouped and rest  # the two processes run them all, once
    # each compiled grouped-GEMM case compiles afresh: the autouse fixture resets dynamo before every test
    compiled = [t for t in grouped if "[compiled-" in t]
    assert len(compiled) == gpu_check.GROUPED_GEMM_COMPILED_CASES
    assert "torch._dynamo.reset()" in (ROOT / "tests" / "test_cuda.py").read_text()


def dry_check(tmp_path, stages, dry=True):
    args = gpu_check.argparse.Namespace(dry=dry, out=str(tmp_path / "out"), work=str(tmp_path / "work"),
                                        budget_s=sum(s.cap_s[dry] for s in stages))
    return gpu_check.Check(args, stages)


@pytest.mark.parametrize("grouped, rest, status, reason", [
    ((8, 0, 0), (4, 0, 0), "ok", None),
    ((8, 0, 0, 1), (4, 0, 0), "FAILED", "tests: tests_grouped_gemm: ERROR tests/test_cuda.py::test_x - RuntimeError"),
    ((7, 1, 0), (4, 0, 0), "FAILED", "tests: tests_grouped_gemm: FAILED tests/test_cuda.py::test_x - AssertionError"),
    ((0, 0, 8), (0, 0, 4), "FAILED", "tests: 0 passed of 12 run; the plan expects 12 passed of 12"),
    (None, (4, 0, 0), "FAILED", "tests: tests_grouped_gemm: RuntimeError: CUDA error: device-side assert triggered"),
], ids=["all-pass", "a-teardown-error", "one-short", "all-skipped", "grouped-gemm-crashes"])
def test_the_tests_stage_runs_two_processes_and_passes_only_when_all_pass(tmp_path, grouped, rest, status, reason):
    """(passed, failed, skipped[, teardown errors]) per process, or None: the process dies of a device-side
    assert, and the other process still runs its tests. A teardown error follows a test's PASSED line."""
    check = dry_check(tmp_path, [gpu_check.BY_NAME["tests"]], dry=False)
    calls = []

    def fake_run(name, cmd, on_line=None, env=None):  # pytest's -v lines, exit status 0, 1, or 5 (nothing ran)
        calls.append((name, cmd[cmd.index("-k") + 1]))
        counts = grouped if name == "tests_grouped_gemm" else rest
        if counts is None:
            return 1, "tests/test_cuda.py::test_grouped_gemm[eager-x]\nRuntimeError: CUDA error: device-side assert triggered"
        outcomes = ["PASSED"] * counts[0] + ["FAILED"] * counts[1] + ["SKIPPED"] * counts[2]
        for i, outcome in enumerate(outcomes):
            on_line(f"tests/test_cuda.py::test_{name}_{i} {outcome} [ 9%]", None)
        teardown_errors = counts[3] if len(counts) > 3 else 0
        for i in range(teardown_errors):  # pytest's line for a fixture that fails after its test passed
            on_line(f"tests/test_cuda.py::test_{name}_{i} ERROR [ 9%]", None)
        failed = ("FAILED tests/test_cuda.py::test_x - AssertionError: 2% off" if counts[1] else
                  "ERROR tests/test_cuda.py::test_x - RuntimeError: CUDA context" if teardown_errors else "")
        return (1 if counts[1] or teardown_errors else 0 if counts[0] else 5), failed
    check.run = fake_run
    check.run_stage(gpu_check.BY_NAME["tests"], gpu_check.stage_tests)
    assert calls == [("tests_grouped_gemm", "grouped_gemm"), ("tests_rest", "not grouped_gemm")]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["tests"]["status"] == status
    if reason is None:
        assert "reason" not in summary["stages"]["tests"] and summary["figures"]["tests"]["passed"] == 12
    else:
        assert summary["stages"]["tests"]["reason"].startswith(reason), summary["stages"]["tests"]["reason"]
    assert summary["figures"]["tests"].get("passed", 0) == sum(c[0] for c in (grouped, rest) if c)


def test_a_bench_ended_at_its_cap_keeps_what_it_measured_marked_partial(tmp_path):
    stages = [gpu_check.BY_NAME["bench_fast"], gpu_check.BY_NAME["bench_tuned"]]
    check = dry_check(tmp_path, stages)

    def fake_run(name, cmd, on_line=None, env=None):  # bench.py wrote the dense model's figures, then the cap
        out = cmd[cmd.index("--json") + 1]
        meta = dict(size="full", dtype="bfloat16", compile=True, attention="cudnn", device_batch_size=64,
                    sequence_length=1024, command="python tools/bench.py", num_experts=4, top_k=1, expert_hidden=None,
                    shared_expert_hidden=0, complete=False, models=["dense", "moe", "E16 top-3 H768 S768"])
        with open(out, "w") as f:
            json.dump(dict(meta=meta, results=dict(dense=dict(step_ms=150.0)), ratios={}), f)
        raise gpu_check.CheckFailed(f"{name}: still running at 160 s: {gpu_check.CAP_REACHED}")
    check.run = fake_run
    for stage in stages:
        check.run_stage(stage, gpu_check.RUNNERS[stage.name])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["bench_fast"]["status"] == "FAILED"  # the first figures must come whole
    assert summary["stages"]["bench_tuned"]["status"] == "cut"  # best effort: reported as cut
    result, failed = gpu_check.verdict(summary)
    assert failed == ["bench_fast"] and result.startswith("failed: bench_fast: ")
    assert result.endswith("(bench_tuned cut at its cap: best effort, not counted)")
    summary["stages"]["bench_fast"]["status"] = "ok"
    assert gpu_check.verdict(summary) == (
        "all stages passed (bench_tuned cut at its cap: best effort, not counted)", [])
    for name in ("bench_fast", "bench_tuned"):
        assert summary["figures"][name]["partial"] and summary["figures"][name]["results"]["dense"]["step_ms"] == 150
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "## bench_fast: fast compile (no coordinate-descent tuning) (partial: dense only)" in readme
    assert "| train step (ms, median) | 150.00 | - | - | - | - |" in readme


def test_a_compiled_step_that_syncs_with_the_host_fails_its_bench_stage(tmp_path):
    """The bench counts host syncs of the compiled step; any fails the stage, and the figures stay in the summary."""
    check = dry_check(tmp_path, [gpu_check.BY_NAME["bench_fast"]])

    def fake_run(name, cmd, on_line=None, env=None):
        meta = dict(size="full", dtype="bfloat16", compile=True, attention="cudnn", device_batch_size=64,
                    sequence_length=1024, command="python tools/bench.py", num_experts=4, top_k=1, expert_hidden=None,
                    shared_expert_hidden=0, complete=True, models=["dense", "moe"])
        results = dict(dense=dict(step_ms=150.0, host_syncs_per_step=0), moe=dict(step_ms=190.0, host_syncs_per_step=2))
        with open(cmd[cmd.index("--json") + 1], "w") as f:
            json.dump(dict(meta=meta, results=results, ratios={}), f)
        return 0, ""
    check.run = fake_run
    check.run_stage(gpu_check.BY_NAME["bench_fast"], gpu_check.RUNNERS["bench_fast"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["bench_fast"]["status"] == "FAILED"
    assert summary["stages"]["bench_fast"]["reason"] == ("bench_fast: the compiled step syncs with the host: "
                                                        "{'moe': 2} times a step")
    assert summary["figures"]["bench_fast"]["results"]["moe"]["step_ms"] == 190.0


def alive(pid: int) -> bool:
    """Running, not merely a zombie that an init which does not reap (a container's) keeps in the table."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_stage_past_its_limit_ends_its_whole_tree_and_the_next_stage_still_runs(tmp_path):
    """A command whose grandchild hangs in a session of its own: at the limit, nothing of it is left."""
    pid_file = tmp_path / "grandchild.pid"
    hang = ["bash", "-c", f"setsid bash -c 'echo $$ > {pid_file}; sleep 300' & sleep 300"]
    args = gpu_check.argparse.Namespace(dry=True, out=str(tmp_path / "out"), work=str(tmp_path / "work"),
                                        budget_s=3.0)
    stages = [gpu_check.Stage("hangs", "", "", {}, (2, 2), []), gpu_check.Stage("fine", "", "", {}, (1, 1), [])]
    check = gpu_check.Check(args, stages)
    check.run_stage(stages[0], lambda c: c.run("hangs", hang))
    grandchild = int(pid_file.read_text())
    assert not gpu_check.tagged_pids(check.tag)
    assert not alive(grandchild)
    check.run_stage(stages[1], lambda c: dict(ran=c.run("fine", ["echo", "ok"])[1].strip()))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["hangs"]["status"] == "FAILED"
    assert summary["stages"]["hangs"]["reason"] == ("hangs: still running at 2 s (the budget is --budget_s 3): "
                                                    "ended at the stage's cap")
    assert summary["stages"]["fine"]["status"] == "ok" and summary["figures"]["fine"] == dict(ran="ok")
    assert (tmp_path / "work" / "logs" / "hangs.out").is_file() and archived(tmp_path / "out", "hangs.out") == ""


def test_sigterm_to_the_check_ends_the_running_stage_and_keeps_the_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry", "--stages", "e2e_dense", "--out",
                             str(out), "--work", str(work)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (work / "logs" / "e2e_dense_part1.out").is_file():
        time.sleep(0.2)
    time.sleep(2)  # the launcher and its worker are up
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["e2e_dense"]["status"] == "running"
    assert gpu_check.tagged_pids(summary["tag"])
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == f"gpu_check: interrupted by SIGTERM; results so far in {out}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"] == "interrupted by SIGTERM" and summary["stages"]["preflight"]["status"] == "ok"
    assert summary["stages"]["e2e_dense"]["status"] == "interrupted"
    assert not gpu_check.tagged_pids(summary["tag"])  # torchrun and its worker, in their own sessions, too
    assert "interrupted" in (out / "README.md").read_text()
    assert "gpu_check: recap" in stdout and "gpu_check: e2e_dense interrupted" in stdout


def test_a_missing_import_is_named_in_one_line_and_skips_only_what_needs_it(tmp_path):
    fake = tmp_path / "fake" / "pytest"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no pytest here')\n")
    result = run_check("--dry", "--stages", "tests", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
                       env={"PYTHONPATH": str(tmp_path / "fake")})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("gpu_check: FAILED: preflight: missing pytest (free disk")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["tests"] == {**summary["stages"]["tests"], "status": "skipped",
                                          "reason": "missing pytest (see preflight)"}


def test_without_a_gpu_the_full_check_says_how_to_run(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    result = run_check("--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == ("gpu_check: no CUDA GPU here; run it on a GPU machine, or with --dry to check "
                                     "the check on a CPU")


def test_an_unknown_stage_is_refused():
    result = run_check("--dry", "--skip", "bnech")
    assert result.returncode == 2 and "unknown stage(s) ['bnech']" in result.stderr


def make_log(steps=30, stop=15, resumed_at=None, first_after=None, end="3.0000", router=True, val_end=None):
    """A log of train_gpt2.py's lines: vals at 0 and the end, train losses falling from 6 by 0.1 a step, a
    SIGTERM at `stop`, a resume from it (at resumed_at) whose first step logs first_after."""
    resumed_at = stop if resumed_at is None else resumed_at
    lines = ["step:0/{n} val_loss:6.2000 train_time:0ms step_avg:nanms"]
    for s in range(1, stop + 1):
        avg = f"{1.0:.2f}" if s > 10 else "nan"
        lines.append(f"step:{s}/{{n}} train_loss:{6 - 0.1 * s:.4f} train_time:{max(0, s - 10)}ms step_avg:{avg}ms "
                     "lr_mult:1.0000")
    lines += [f"step:{stop}/{{n}} stopped by SIGTERM: checkpoint logs/x/state_step{stop:06d}.pt",
              f"resume: from logs/x/state_step{stop:06d}.pt at step {resumed_at}"]
    for s in range(resumed_at + 1, steps + 1):
        loss = first_after if s == resumed_at + 1 and first_after is not None else 6 - 0.1 * s
        lines.append(f"step:{s}/{{n}} train_loss:{loss:.4f} train_time:{s}ms step_avg:1.00ms lr_mult:1.0000")
    lines.append(f"step:{{n}}/{{n}} val_loss:{val_end or end} train_time:{steps}ms step_avg:1.00ms")
    if router:
        lines.append("step:{n}/{n} router layer:0 train_load:0.5,0.5")
    return "\n".join(lines).replace("{n}", str(steps))


def test_check_log_accepts_a_healthy_resume_and_names_what_a_sick_one_lacks():
    figures = gpu_check.check_log(make_log(), "moe", 30, cuda=False, vocab_size=512)
    assert figures["resumed_at"] == 15 and figures["timed_steps"] == [5, 5]
    assert figures["first_loss_after_resume"] == pytest.approx(4.4)  # step 16 goes on from the stop
    assert figures["losses_before_stop"] == pytest.approx([4.9, 4.8, 4.7, 4.6, 4.5])
    assert (figures["val_loss_start"], figures["val_loss_end"], figures["step_avg_ms"]) == (6.2, 3.0, 1.0)
    cases = [
        (make_log(first_after=math.log(512)), "moe", False, "the first loss after the resume, 6.2383, is outside"),
        (make_log(resumed_at=0), "moe", False, "stopped at step 15, resumed at 0, went on at step 1: the step count"),
        (make_log(stop=12), "moe", False, "the two parts time 2 and 8 steps (fewer than 5)"),
        (make_log(val_end="6.3000"), "moe", False, "the val loss did not fall (6.2000 -> 6.3000)"),
        (make_log(router=False), "moe", False, "no router lines"),
        (make_log(), "dense", True, "no peak-memory line"),
        (make_log(val_end="nan"), "moe", False, "a non-finite loss"),
        (make_log().replace("stopped by SIGTERM", "stopped by"), "moe", False, "no 'stopped by SIGTERM' checkpoint"),
    ]
    for text, mode, cuda, message in cases:
        with pytest.raises(gpu_check.CheckFailed) as e:
            gpu_check.check_log(text, mode, 30, cuda=cuda, vocab_size=512)
        assert message in str(e.value), (message, str(e.value))

"""gpu_check.py: its --dry path runs every default stage on the CPU and counts their compiles against the plan,
so the check cannot rot (or quietly grow) while no GPU is at hand; its process control and summaries."""
import json
import os
import shutil
import signal
import subprocess
import sys
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


def test_dry_run_passes_every_stage_with_the_planned_compiles_and_no_torchrun_on_path(tmp_path):
    path = without_torchrun_path()
    assert shutil.which("torchrun", path=path) is None and shutil.which("setsid", path=path)
    out, work = tmp_path / "out", tmp_path / "work"
    result = run_check("--dry", "--out", str(out), "--work", str(work), env={"PATH": path})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.startswith("gpu_check: the plan") and f"results into {out}" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"] == "all stages passed"
    for name, stage in summary["stages"].items():
        assert stage["status"] == "ok", (name, stage)
        # the compiles the plan promised, no more: a change that adds compiles to the GPU run fails here
        assert stage.get("compiles", 0) == stage["planned_compiles"], (name, stage)
    assert summary["stages"]["bench_fast"]["compiles"] > 0 and summary["stages"]["e2e_moe"]["compiles"] > 0
    # the e2e runs found the bench's compiled graphs in the shared cache: only the eval graph is new
    assert summary["stages"]["e2e_moe"]["inductor_graphs_compiled"] == 1
    # tests/test_cuda.py, every test skipped without CUDA, which is what --dry expects
    assert summary["figures"]["tests"] == dict(expected_passed=0, skipped=gpu_check.EXPECTED_CUDA_TESTS)
    assert summary["figures"]["preflight"]["compile"] == "a tiny function compiled on cpu"
    bench = summary["figures"]["bench_fast"]
    assert bench["meta"]["label"].startswith("fast compile")
    assert summary["figures"]["bench_tuned"]["meta"]["label"].startswith("the record's settings")
    assert bench["meta"]["complete"] and bench["meta"]["compile"] and bench["meta"]["dtype"] == "bfloat16"
    assert bench["results"]["moe"]["step_ms"] > 0 and bench["ratios"]["step_ms"] > 0
    assert bench["results"]["moe"]["graph_breaks"] == 0 and bench["results"]["moe"]["recompiles"] == 0
    figures = summary["figures"]["e2e_moe"]
    assert figures["val_loss_end"] < figures["val_loss_start"]
    log = (out / "e2e_moe.txt").read_text()
    assert "stopped by SIGTERM: checkpoint" in log and "resume: from" in log and " router layer:" in log
    assert all((out / name).is_file() for name in summary["files"])
    readme = (out / "README.md").read_text()
    assert readme.startswith("# GPU check: CPU (dry run)") and "| e2e_moe | ok |" in readme
    assert "| train step (ms, median) |" in readme and "## End to end" in readme and "## bench_tuned" in readme


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
    assert all(s.estimate_s <= s.cap_s[0] for s in default if not s.best_effort)
    assert "the check at 540 s" in lines[0]
    assert [s.name for s in default][:2] == ["preflight", "bench_fast"]  # the figures only a GPU gives, first


def test_the_plan_expects_every_test_of_test_cuda():
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_cuda.py"], cwd=ROOT,
                               capture_output=True, text=True)
    assert f"{gpu_check.EXPECTED_CUDA_TESTS} tests collected" in collected.stdout


def dry_check(tmp_path, stages, dry=True):
    args = gpu_check.argparse.Namespace(dry=dry, out=str(tmp_path / "out"), work=str(tmp_path / "work"),
                                        budget_s=sum(s.cap_s[dry] for s in stages))
    return gpu_check.Check(args, stages)


@pytest.mark.parametrize("passed, skipped", [(11, 1), (0, 12)], ids=["one-short", "all-skipped"])
def test_the_tests_stage_fails_when_fewer_pass_than_the_plan_expects(tmp_path, passed, skipped):
    check = dry_check(tmp_path, [gpu_check.BY_NAME["tests"]], dry=False)

    def fake_run(name, cmd, on_line=None, env=None):  # pytest's -v lines, exit status 0 or 5 (nothing ran)
        for i in range(passed + skipped):
            on_line(f"tests/test_cuda.py::test_{i} {'PASSED' if i < passed else 'SKIPPED'} [ 9%]", None)
        return (0 if passed else 5), ""
    check.run = fake_run
    check.run_stage(gpu_check.BY_NAME["tests"], gpu_check.stage_tests)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["tests"]["status"] == "FAILED"
    assert summary["stages"]["tests"]["reason"] == (f"tests: {passed} passed of 12 run; the plan expects 12 passed of 12")
    assert summary["figures"]["tests"]["passed" if passed else "skipped"] == (passed or skipped)


def test_a_bench_ended_at_its_cap_keeps_what_it_measured_marked_partial(tmp_path):
    stages = [gpu_check.BY_NAME["bench_fast"], gpu_check.BY_NAME["bench_tuned"]]
    check = dry_check(tmp_path, stages)

    def fake_run(name, cmd, on_line=None, env=None):  # bench.py wrote the dense model's figures, then the cap
        out = cmd[cmd.index("--json") + 1]
        meta = dict(size="full", dtype="bfloat16", compile=True, attention="cudnn", device_batch_size=64,
                    sequence_length=1024, command="python tools/bench.py", num_experts=4, top_k=1, expert_hidden=None,
                    shared_expert_hidden=0, complete=False)
        with open(out, "w") as f:
            json.dump(dict(meta=meta, results=dict(dense=dict(step_ms=150.0)), ratios={}), f)
        raise gpu_check.CheckFailed(f"{name}: still running at 160 s: {gpu_check.CAP_REACHED}")
    check.run = fake_run
    for stage in stages:
        check.run_stage(stage, gpu_check.RUNNERS[stage.name])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["bench_fast"]["status"] == "FAILED"  # the first figures must come whole
    assert summary["stages"]["bench_tuned"]["status"] == "partial"  # best effort, in the time left
    for name in ("bench_fast", "bench_tuned"):
        assert summary["figures"][name]["partial"] and summary["figures"][name]["results"]["dense"]["step_ms"] == 150
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "## bench_fast: fast compile (no coordinate-descent tuning) (partial: dense only)" in readme
    assert "| train step (ms, median) | 150.00 | - | - |" in readme


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
    assert (tmp_path / "out" / "hangs.out").is_file()


def test_sigterm_to_the_check_ends_the_running_stage_and_keeps_the_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry", "--stages", "e2e_dense", "--out",
                             str(out), "--work", str(work)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "e2e_dense_part1.out").is_file():
        time.sleep(0.2)
    time.sleep(2)  # the launcher and its worker are up
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["e2e_dense"]["status"] == "running"
    assert gpu_check.tagged_pids(summary["tag"])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == f"gpu_check: interrupted by SIGTERM; results so far in {out}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"] == "interrupted by SIGTERM" and summary["stages"]["preflight"]["status"] == "ok"
    assert summary["stages"]["e2e_dense"]["status"] == "interrupted"
    assert not gpu_check.tagged_pids(summary["tag"])  # torchrun and its worker, in their own sessions, too
    assert "interrupted" in (out / "README.md").read_text()


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


LOG = """step:0/8 val_loss:6.2000 train_time:0ms step_avg:nanms
{trains}
step:3/8 stopped by SIGTERM: checkpoint logs/x/state_step000003.pt
resume: from logs/x/state_step000003.pt at step 3
step:4/8 val_loss:{mid} train_time:10ms step_avg:nanms
step:8/8 val_loss:{end} train_time:20ms step_avg:5.00ms
{router}"""


def make_log(end="5.0000", router="step:8/8 router layer:0 train_load:0.5,0.5", mid="5.5000"):
    trains = "\n".join(f"step:{s}/8 train_loss:6.0000 train_time:{s}ms step_avg:1.00ms lr_mult:1.0000"
                       for s in range(1, 9))
    return LOG.format(trains=trains, end=end, router=router, mid=mid)


def test_check_log_accepts_a_healthy_log_and_names_what_a_sick_one_lacks():
    figures = gpu_check.check_log(make_log(), "moe", 8, cuda=False)
    assert figures == dict(val_loss_start=6.2, val_loss_end=5.0, step_avg_ms=1.0, peak_memory_mib=None)
    cases = [(make_log(end="6.3000"), "moe", False, "the val loss did not fall (6.2000 -> 6.3000)"),
             (make_log(router=""), "moe", False, "no router lines"),
             (make_log(), "dense", True, "no peak-memory line"),
             (make_log(end="nan"), "moe", False, "a non-finite loss"),
             (make_log().replace("stopped by SIGTERM", "stopped by"), "moe", False, "no 'stopped by SIGTERM'")]
    for text, mode, cuda, message in cases:
        with pytest.raises(gpu_check.CheckFailed, match=message.replace("(", r"\(").replace(")", r"\)")):
            gpu_check.check_log(text, mode, 8, cuda=cuda)

"""gpu_check.py: its --dry path runs every stage on the CPU, so the check cannot rot while no GPU is at hand."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
import gpu_check  # noqa: E402


def run_check(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "gpu_check.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_dry_run_passes_every_stage_and_writes_one_folder(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = run_check("--dry", "--out", str(out), "--work", str(work))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("tests", "bench", "e2e"):
        assert f"gpu_check: {stage} ok in " in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"] == "all stages passed"
    assert summary["figures"]["tests"]["skipped"] >= 5  # tests/test_cuda.py, skipped without CUDA
    bench = summary["figures"]["bench"]["bench_b64"]
    assert bench["results"]["moe"]["step_ms"] > 0 and bench["ratios"]["step_ms"] > 0
    for mode in ("moe", "dense"):
        e2e = summary["figures"]["e2e"][mode]
        assert e2e["val_loss_end"] < e2e["val_loss_start"]
        log = (out / f"e2e_{mode}.txt").read_text()
        assert "stopped by SIGTERM: checkpoint" in log and "resume: from" in log
    assert all((out / name).is_file() for name in summary["files"])
    readme = (out / "README.md").read_text()
    assert readme.startswith("# GPU check: CPU (dry run)") and "| e2e | ok |" in readme
    assert "| train step (ms) |" in readme and "| moe |" in readme


def test_a_stage_that_runs_out_of_time_stops_the_check_with_one_line(tmp_path):
    result = run_check("--dry", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--budget_s", "0.5",
                       "--skip", "tests")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "gpu_check: FAILED: bench_b64: still running when the 0.5 s budget ran out (--budget_s)")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"] == {"tests": {"status": "skipped"}, "bench": summary["stages"]["bench"]}
    assert summary["stages"]["bench"]["status"] == "FAILED"  # and e2e never started


def test_without_a_gpu_the_full_check_says_how_to_run(tmp_path):
    pytest.importorskip("torch")
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
    trains = "\n".join(f"step:{s}/8 train_loss:6.0000 train_time:{s}ms step_avg:1.00ms" for s in range(1, 9))
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


def test_the_budget_also_stops_an_end_to_end_run_in_flight(tmp_path):
    # 6 s: the shards are written, the MoE run starts, and it is still going when the budget ends
    result = run_check("--dry", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--budget_s", "6",
                       "--skip", "tests,bench")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gpu_check: FAILED: e2e") and last.endswith("6 s budget ran out (--budget_s)") or \
        last == "gpu_check: FAILED: e2e moe: the check ran out of its 6 s budget (--budget_s)", last

"""records/ab.py: an A/B of two scripts (or two flag sets) with matched, interleaved pairs, its table, Ctrl-C."""
import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import ROOT, TINY, data_flags, train_losses
from compare import parse_log

AB = [sys.executable, str(ROOT / "records" / "ab.py")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC": "1"}


def trainer_flags(shards, steps=12, val_every=6):
    return [*TINY, *data_flags(shards), "--num_iterations", str(steps), "--warmdown_iters", "4",
            "--val_loss_every", str(val_every)]


def manifest(out):
    return json.loads((out / "ab.json").read_text())


def test_an_ab_runs_matched_interleaved_pairs_of_a_refs_script_and_prints_both_tests(shards, tmp_path):
    """The new side: the working tree's script with a flag; the base: HEAD's script (git show). Two runs at a
    time, both logging into one folder: each log must still be credited to its own side and pair."""
    out = tmp_path / "ab"
    result = subprocess.run([*AB, "--base", "HEAD", "--new_flags", "--mlp_output_scale 0.5", "--runs", "2",
                             "--jobs", "2", "--seed_offset", "7", "--target", "4.5", "--out", str(out), "--",
                             *trainer_flags(shards)], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = manifest(out)["runs"]
    assert [(r["side"], r["pair"], r["seed"], r["status"]) for r in runs] == [
        ("new", 0, 7, 0), ("base", 0, 7, 0), ("new", 1, 8, 0), ("base", 1, 8, 0)]  # A B A B
    events = [line for line in result.stdout.splitlines() if line.startswith("ab: pair")]
    assert events.index("ab: pair 1/2, new: exited 0") > 1 and events[1].startswith("ab: pair 1/2, base:")  # together
    logs = {(r["side"], r["pair"]): parse_log(out / r["log"]) for r in runs}
    for (side, pair), run in logs.items():  # each pair shares its initialisation and its data order
        assert (run.hyper["seed"], run.hyper["data_seed"]) == (7 + pair, 7 + pair)
        assert run.hyper["mlp_output_scale"] == (0.5 if side == "new" else 1.0)
    # the step-2 losses differ between pairs (another data order and init), not within a pair's two scripts
    # beyond what the flag does
    assert train_losses((out / runs[0]["log"]).read_text().splitlines())[2] != \
        train_losses((out / runs[2]["log"]).read_text().splitlines())[2]
    diffs = [logs["new", p].final_val - logs["base", p].final_val for p in (0, 1)]
    head = subprocess.run(["git", "show", "HEAD:train_gpt2.py"], cwd=ROOT, capture_output=True, text=True).stdout
    assert all(run.source.strip() == (head if side == "base" else (ROOT / "train_gpt2.py").read_text()).strip()
               for (side, _), run in logs.items())
    table = result.stdout[result.stdout.index("A/B in"):]
    assert "| matched pairs | 2 |" in table
    assert f"| mean difference of final val (paired) | {sum(diffs) / 2:+.4f} ±" in table
    mean, half = sum(diffs) / 2, 12.7062047 * abs(diffs[0] - diffs[1]) / 2  # t(0.975, 1 df) x sd / sqrt(2)
    assert f"| 95% interval of the mean difference (paired t) | [{mean - half:+.4f}, {mean + half:+.4f}] |" in table
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for row in ("| new | working tree | --mlp_output_scale 0.5 | 2 |", f"| base | HEAD (train_gpt2_{sha}.py) | - | 2 |",
                "Welch's t-test", "paired t-test", "step_avg ratio", "time-to-4.5 ratio",
                "record rule (mean final val < 4.5, one-sided p < 0.01)"):
        assert row in table, row
    again = subprocess.run([*AB, "--table", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == table.strip()


def test_a_base_that_is_no_git_ref_is_one_line(tmp_path):
    bad = subprocess.run([*AB, "--base", "no-such-ref", "--out", str(tmp_path / "bad"), "--"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: --base no-such-ref: not a git ref")


def test_a_flag_one_side_refuses_stops_before_any_run(shards, tmp_path):
    result = subprocess.run([*AB, "--same_script", "--new_flags", "--top_k 3", "--out", str(tmp_path / "ab"), "--",
                             *trainer_flags(shards)], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: the new side (train_gpt2.py) refuses its flags: error: --top_k 3 must lie in [1, --num_experts 1]"]
    assert not list((tmp_path / "ab").glob("*.txt"))


def test_ctrl_c_stops_cleanly_and_the_pairs_done_still_give_the_table(shards, tmp_path):
    out = tmp_path / "ab"
    proc = subprocess.Popen([*AB, "--same_script", "--runs", "3", "--out", str(out), "--",
                             *trainer_flags(shards, 300, val_every=0)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # until the second pair's first run is training
        logs = sorted(out.glob("*.txt"), key=lambda p: p.stat().st_mtime)
        if len(logs) == 3 and re.search(r"^step:\d+/\d+ train_loss:", logs[-1].read_text(), re.M):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "interrupted" in stderr and "| matched pairs | 1 |" in stdout
    third = manifest(out)["runs"][2]
    assert third["status"] == "interrupted" and "stopped by SIGTERM: checkpoint" in (out / third["log"]).read_text()

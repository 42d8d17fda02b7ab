"""tools/ab.py: an A/B of two scripts (or two flag sets) with matched, interleaved pairs, its table, Ctrl-C."""
import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import ROOT, TINY, data_flags, train_losses
from compare import parse_log

AB = [sys.executable, str(ROOT / "tools" / "ab.py")]
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


def ab_folder(out, finals, flags=("--batch_size", "8", "--sequence_length", "32", "--num_iterations", "100")):
    """An A/B folder by hand: finals[side] is one final val loss per pair; each log's hyperparameters are its
    manifest flags' (seed and data seed 1 + pair), its val curve 6.0 at step 0, then the final at 100."""
    from test_compare import our_log
    from train_gpt2 import parse_args
    out.mkdir()
    entries = []
    for side in ("new", "base"):
        for pair, final in enumerate(finals[side]):
            entry_flags = [*flags, "--seed", str(1 + pair), "--data_seed", str(1 + pair)]
            hyper = {k: v for k, v in vars(parse_args(entry_flags)).items()}
            our_log(out / f"{side}{pair}.txt", [(0, 6.0, 0), (100, final, 1000 if side == "base" else 1300)],
                    hyper=hyper)
            entries.append(dict(side=side, pair=pair, seed=1 + pair, status=0, log=f"{side}{pair}.txt",
                                flags=entry_flags))
    (out / "ab.json").write_text(json.dumps(dict(new="working tree", base="working tree", new_flags=[],
                                                 base_flags=[], flags=[], target=3.28, nproc=1, runs=entries)))
    return out


def ab_table(out):
    result = subprocess.run([*AB, "--table", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout, result.stderr


def test_a_log_that_is_not_its_manifest_entry_is_refused_in_one_line(tmp_path):
    out = ab_folder(tmp_path / "ab", dict(new=[3.30, 3.31, 3.29], base=[3.32, 3.33, 3.30]))
    assert ab_table(out)[0] == 0
    runs = manifest(out)["runs"]
    runs[0]["log"], runs[1]["log"] = runs[1]["log"], runs[0]["log"]  # two new logs swapped between pairs
    (out / "ab.json").write_text(json.dumps({**manifest(out), "runs": runs}))
    code, stdout, stderr = ab_table(out)
    assert code != 0 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith(f"error: {out / 'new1.txt'}: ab.json has it as pair 1's new side, but it ran ")
    assert "data_seed 2 (manifest 1)" in stderr and "seed 2 (manifest 1)" in stderr
    runs[0]["log"], runs[1]["log"] = runs[1]["log"], runs[0]["log"]
    runs[0]["flags"] = [*runs[0]["flags"], "--muon_lr", "0.03"]  # a flag the log did not run with
    (out / "ab.json").write_text(json.dumps({**manifest(out), "runs": runs}))
    assert "but it ran muon_lr 0.02 (manifest 0.03)" in ab_table(out)[2]


def test_a_copied_log_counts_once_and_no_spread_is_never_p_0(tmp_path):
    out = ab_folder(tmp_path / "ab", dict(new=[3.20, 3.20], base=[3.25, 3.25]))
    code, table, _ = ab_table(out)
    assert code == 0
    assert "| paired t-test | no spread, n too small |" in table and "p = 0" not in table
    assert "| 3.2000 ± 0.0000 | 14.44 ms | no spread, n too small |" in table  # step_avg 1300 ms / 90
    assert "the new side cannot be tested against it (n = 2, p = no spread, n too small)" in table
    runs = manifest(out)["runs"]
    (out / "copy.txt").write_bytes((out / "base0.txt").read_bytes())
    runs[3]["log"] = "copy.txt"  # pair 2's base names a copy of pair 1's: one run, counted once
    (out / "ab.json").write_text(json.dumps({**manifest(out), "runs": runs}))
    code, table, stderr = ab_table(out)
    assert code == 0 and "note: copy.txt (pair 2, base) is a copy of base0.txt; counted once" in stderr
    assert "| matched pairs | 1 |" in table


def test_time_to_target_is_interpolated_and_one_side_reaching_it_wins_the_pair(tmp_path):
    # pair 1: both reach 3.28 (base earlier in time: its steps are faster); pair 2: only new does; pair 3: neither
    out = ab_folder(tmp_path / "ab", dict(new=[3.00, 3.20, 3.50], base=[3.10, 3.40, 3.45]))
    code, table, _ = ab_table(out)
    assert code == 0
    # linear from 6.0 at step 0: new reaches 3.28 at 2.72/3.0 of 1300 ms, base at 2.72/2.9 of 1000 ms
    assert f"| {(2.72 / 3.0 * 1300) / (2.72 / 2.9 * 1000):.3f} (1 pairs) |" in table
    assert "| first to 3.28 (one side reaching it wins the pair) | new in 1, base in 1, neither in 1 |" in table


def test_the_table_computes_each_row_from_the_runs(tmp_path):
    """Every figure of the table against scipy on the same final losses: Welch's test over all runs, the paired
    test and its interval, the step_avg ratio (1300 ms against 1000 ms over the 90 timed steps of 100) and the
    speedrun's record rule, both ways."""
    from scipy import stats
    new, base = [3.20, 3.25, 3.22], [3.30, 3.28, 3.35]
    code, table, _ = ab_table(ab_folder(tmp_path / "ab", dict(new=new, base=base)))
    assert code == 0
    welch = stats.ttest_ind(new, base, equal_var=False)
    paired = stats.ttest_rel(new, base)
    diffs = [a - b for a, b in zip(new, base)]
    mean, sd = sum(diffs) / 3, stats.tstd(diffs)
    half = stats.t.ppf(0.975, 2) * sd / 3 ** 0.5
    assert f"| Welch's t-test (all finished runs) | t = {welch.statistic:.2f}, p = {welch.pvalue:.3g} |" in table
    assert f"| paired t-test | t = {paired.statistic:.2f}, p = {paired.pvalue:.3g} |" in table
    assert f"| mean difference of final val (paired) | {mean:+.4f} ± {sd:.4f} |" in table
    assert f"| 95% interval of the mean difference (paired t) | [{mean - half:+.4f}, {mean + half:+.4f}] |" in table
    assert "| step_avg ratio (mean over pairs) | 1.300 |" in table
    below = stats.ttest_1samp(new, 3.28, alternative="less").pvalue
    assert f"| new | working tree | - | 3 | 3.2233 ± 0.0252 | 14.44 ms | {below:.3g} |" in table
    assert f"the new side does not meet it (n = 3, p = {below:.3g})" in table  # 0.0299: not below 0.01
    fast = [3.10, 3.11, 3.12]
    code, table, _ = ab_table(ab_folder(tmp_path / "ab2", dict(new=fast, base=base)))
    p = stats.ttest_1samp(fast, 3.28, alternative="less").pvalue
    assert code == 0 and p < 0.01 and f"the new side meets it (n = 3, p = {p:.3g})" in table


def test_an_ab_goes_on_in_its_folder_and_reuses_finished_runs_elsewhere(shards, tmp_path):
    """--base_flags set the base side only; rerunning into the folder runs only the pairs not done; --reuse copies
    finished runs of the same script, flags and seeds from another folder instead of running them again."""
    common = ["--same_script", "--base_flags", "--mlp_output_scale 0.5", "--seed_offset", "3"]
    flags = ["--", *trainer_flags(shards, steps=4, val_every=0)]
    first = tmp_path / "first"
    result = subprocess.run([*AB, *common, "--runs", "1", "--out", str(first), *flags], cwd=ROOT, capture_output=True,
                            text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    before = manifest(first)["runs"]
    scales = {e["side"]: parse_log(first / e["log"]).hyper["mlp_output_scale"] for e in before}
    assert scales == dict(new=1.0, base=0.5)
    result = subprocess.run([*AB, *common, "--runs", "2", "--out", str(first), *flags], cwd=ROOT, capture_output=True,
                            text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    started = [l for l in result.stdout.splitlines() if l.startswith("ab: pair") and ".py " in l]
    assert len(started) == 2 and all(l.startswith("ab: pair 2/2") for l in started)  # pair 1 was done
    after = manifest(first)["runs"]
    assert after[:2] == before and [(e["side"], e["pair"], e["status"]) for e in after[2:]] == [
        ("new", 1, 0), ("base", 1, 0)]
    second = tmp_path / "second"
    result = subprocess.run([*AB, *common, "--runs", "2", "--out", str(second), "--reuse", str(first), *flags],
                            cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("ab: reused ") == 4 and ": exited " not in result.stdout  # nothing ran
    assert {e["log"] for e in manifest(second)["runs"]} == {e["log"] for e in after}
    assert all((second / e["log"]).read_bytes() == (first / e["log"]).read_bytes() for e in after)
    assert ab_table(second)[1].split("\n", 1)[1] == ab_table(first)[1].split("\n", 1)[1]  # (its first line: the folder)

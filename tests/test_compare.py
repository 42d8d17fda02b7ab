"""tools/compare.py on real logs from the trainer and on hand-made edge cases."""
import math
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, data_flags, run_trainer

import compare

FENCE = "=" * 100


def our_log(path, vals, trains=(), num_iterations=100, hyper=None, tail="", router=()):
    """A log in train_gpt2.py's format: fenced source, environment, hyperparameters, step lines."""
    hyper = hyper or dict(batch_size=8, sequence_length=32, num_experts=1, num_iterations=num_iterations, seed=1)
    lines = [FENCE, "print('source')", FENCE, "Running pytorch 2.13.0 compiled for CUDA None", FENCE,
             f"hyperparameters: {hyper!r}"]
    for step, loss, ms in vals:
        lines.append(f"step:{step}/{num_iterations} val_loss:{loss:.4f} train_time:{ms}ms step_avg:{ms / max(step - 10, 1):.2f}ms")
    for step, loss in trains:
        lines.append(f"step:{step}/{num_iterations} train_loss:{loss:.4f} train_time:100ms step_avg:10.00ms")
    lines += list(router)
    path.write_text("\n".join(lines) + "\n" + tail)
    return path


def speedrun_log(path):
    """The speedrun's own format: its source declares the hyperparameters; no hyperparameters line."""
    source = ["@dataclass", "class Hyperparameters:",
              "    batch_size : int = 8*64 # batch size, in sequences, across all devices",
              "    sequence_length : int = 1024 # sequence length, in tokens",
              "    num_iterations : int = 3200 # number of iterations to run"]
    steps = [f"step:{s}/3200 val_loss:{v} train_time:{t}ms step_avg:{a}ms" for s, v, t, a in
             [(0, "10.8258", 327, "nan"), (3000, "3.2901", 420000, "140.00"), (3200, "3.2785", 448000, "140.04")]]
    path.write_text("\n".join([FENCE, *source, FENCE, "Running pytorch 2.5.1+cu124 compiled for CUDA 12.4",
                               "nvidia-smi:", "| NVIDIA H100 80GB HBM3 |", FENCE,
                               "step:1/3200 train_loss:10.8258 train_time:12839ms step_avg:nanms", *steps,
                               "peak memory consumption: 22101 MiB"]) + "\n")
    return path


def test_reads_the_speedruns_own_format(tmp_path):
    run = compare.parse_log(speedrun_log(tmp_path / "4a71cc92-0f43-4058-a033-23e85c1e98f1.txt"))
    assert run.mode == "dense" and run.finished and run.final_val == 3.2785
    assert run.tokens_per_step == 512 * 1024 and run.peak_mib == 22101
    # reached between the validations at 3000 (3.2901, 420 s) and 3200 (3.2785, 448 s): interpolated linearly
    w = (3.2901 - 3.28) / (3.2901 - 3.2785)
    assert run.crossing(3.28) == pytest.approx((3000 + 200 * w, 420000 + 28000 * w)) and 3174 < 3000 + 200 * w < 3175
    assert run.crossing(3.2785) == (3200, 448000.0) and run.crossing(11) == (0, 327.0)  # met at a validation
    assert run.name == f"{tmp_path.name}/4a71cc92"
    table = compare.runs_table([run], 3.28)
    row = table.splitlines()[2]
    assert "| dense | 3200/3200 | 3.2785 | 3174 | 444.4 s | 140.04 ms | 1.68B | 22101 MiB |" in row


def test_a_run_that_never_reaches_the_target(tmp_path):
    run = compare.parse_log(our_log(tmp_path / "r.txt", [(0, 6.0, 0), (50, 4.0, 500), (100, 3.5, 1000)]))
    assert run.crossing(3.28) is None and run.finished
    assert "| 100/100 | 3.5000 | - | - |" in compare.runs_table([run], 3.28)


def test_a_single_validation_line(tmp_path):
    run = compare.parse_log(our_log(tmp_path / "r.txt", [(0, 6.0, 0)], trains=[(1, 5.9), (2, 5.8)]))
    assert run.final_val == 6.0 and not run.finished and run.last_step == 2
    assert "2/100 unfinished" in compare.runs_table([run], 3.28)


def test_a_log_cut_off_mid_line_is_read_to_its_last_complete_line(tmp_path, capsys):
    path = our_log(tmp_path / "r.txt", [(0, 6.0, 0), (100, 3.0, 900)], tail="step:100/100 val_lo")
    path.write_text(path.read_text().replace("step:100/100 val_loss:3.0000", "step:50/100 val_loss:3.9000"))
    runs = compare.load_runs([str(path)])
    assert "ends in the middle of a line" in capsys.readouterr().err
    (run,) = runs
    assert run.cut_off and not run.finished and run.final_val == 3.9
    # a complete last line that is the final step, but the file was cut after it: still unfinished
    cut = our_log(tmp_path / "c.txt", [(0, 6.0, 0), (100, 3.0, 900)], tail="peak mem")
    assert not compare.parse_log(cut).finished


def test_empty_foreign_and_valless_logs_are_named_and_skipped_and_the_table_still_prints(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notes.txt").write_text("meeting notes\nnothing to see\n")
    # a saved stdout of a run: step lines, but not the log (no source): not read as a run
    (tmp_path / "stdout.txt").write_text("seed:1 world_size:1\nstep:0/100 val_loss:6.0000 train_time:0ms step_avg:nanms\n"
                                         "step:100/100 val_loss:3.1000 train_time:9ms step_avg:0.10ms\n")
    (tmp_path / "foreign.txt").write_text("=" * 100 + "\nprint('x')\n" + "=" * 100 + "\nno steps here\n")
    our_log(tmp_path / "trains_only.txt", [], trains=[(1, 5.0)])
    our_log(tmp_path / "good.txt", [(0, 6.0, 0), (100, 3.2, 1000)])
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "compare.py"), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0
    assert f"skipped {tmp_path / 'empty.txt'}: empty file" in result.stderr
    not_a_log = "not a run log (a run log begins with the script's source, fenced by a line of 100 '=')"
    assert f"skipped {tmp_path / 'notes.txt'}: {not_a_log}" in result.stderr
    assert f"skipped {tmp_path / 'stdout.txt'}: {not_a_log}" in result.stderr
    assert f"skipped {tmp_path / 'foreign.txt'}: not a training log (no step lines)" in result.stderr
    assert len(result.stderr.splitlines()) == 5 and "3.1000" not in result.stdout
    assert f"skipped {tmp_path / 'trains_only.txt'}: no validation line" in result.stderr
    assert "good" in result.stdout and "| 3.2000 | 97 |" in result.stdout  # 3.28 reached near step 97 of 0-100
    only_bad = subprocess.run([sys.executable, str(ROOT / "tools" / "compare.py"), str(tmp_path / "empty.txt")],
                              capture_output=True, text=True)
    assert only_bad.returncode == 1 and "no runs to compare" in only_bad.stderr


def test_a_log_copied_into_another_folder_is_one_run(tmp_path, capsys):
    """tools/ab.py --reuse copies a finished run into a second A/B folder: read together, it counts once."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = our_log(tmp_path / "a" / "run.txt", [(0, 6.0, 0), (100, 3.2, 1000)])
    (tmp_path / "b" / "run.txt").write_bytes(first.read_bytes())
    our_log(tmp_path / "b" / "other.txt", [(0, 6.0, 0), (100, 3.3, 1000)])
    runs = compare.load_runs([str(tmp_path), str(first)])
    assert sorted(run.final_val for run in runs) == [3.2, 3.3]
    assert capsys.readouterr().err.splitlines() == [
        f"note: {tmp_path / 'b' / 'run.txt'} is a copy of {first}; counted once",
        f"note: {first} is named twice; counted once"]


def test_a_resumed_runs_repeated_steps_take_the_last_line(tmp_path):
    path = our_log(tmp_path / "r.txt", [(0, 6.0, 0), (50, 4.0, 500), (50, 4.1, 520), (100, 3.1, 990)])
    run = compare.parse_log(path)
    assert run.val[50] == (4.1, 520.0, 520 / 40)


def test_moe_mode_and_router_lines(tmp_path):
    hyper = dict(batch_size=8, sequence_length=32, num_experts=4, top_k=1, router="learned", router_gate="st",
                 aux_loss_coef=0.01, null_expert_bias=10.0, router_bias_rate=0.001, balance_scope="global")
    router = ["step:100/100 router layer:0 train_load:0.2500,0.2500,0.3000,0.2000 val_load:0.25,0.25,0.25,0.25 "
              "max_violation:0.2 entropy:0.9"]
    run = compare.parse_log(our_log(tmp_path / "r.txt", [(0, 6.0, 0), (100, 3.1, 990)], hyper=hyper, router=router))
    assert run.mode == "moe E4 top1 learned st aux0.01 null10.0 bias0.001 global"
    assert run.router[100][0]["train_load"] == [0.25, 0.25, 0.3, 0.2] and run.router[100][0]["entropy"] == 0.9


def test_group_statistics_and_the_one_sided_t_test(tmp_path):
    from scipy import stats
    finals = [3.2770, 3.2790, 3.2765, 3.2782, 3.2774]
    for i, v in enumerate(finals):
        our_log(tmp_path / f"dense{i}.txt", [(0, 6.0, 0), (100, v, 1000)],
                hyper=dict(batch_size=8, sequence_length=32, num_experts=1, seed=i))  # seeds differ: one config
    our_log(tmp_path / "moe.txt", [(0, 6.0, 0), (100, 3.25, 1000)],
            hyper=dict(batch_size=8, sequence_length=32, num_experts=4, top_k=1, seed=0))
    our_log(tmp_path / "crashed.txt", [(0, 6.0, 0), (50, 3.9, 500)],
            hyper=dict(batch_size=8, sequence_length=32, num_experts=1, seed=9))
    runs = compare.load_runs([str(tmp_path)])
    grouped = compare.groups(runs)
    assert sorted(len(v) for v in grouped.values()) == [1, 6]
    n, mean = 5, sum(finals) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in finals) / 4)
    t = (mean - 3.28) / (sd / math.sqrt(n))
    p = compare.one_sided_p_value(finals, 3.28)
    assert p == pytest.approx(stats.t.cdf(t, n - 1)) and p < 0.01  # 'less': the lower tail
    assert compare.one_sided_p_value([3.2790, 3.2810, 3.2800], 3.28) == pytest.approx(0.5)
    table = compare.groups_table(runs, 3.28)
    dense_row = next(line for line in table.splitlines() if line.startswith("| dense"))
    assert f"| 5 | {mean:.4f} | {sd:.4f} | 11.11 ms | {p:.3g} | 1 |" in dense_row
    assert compare.one_sided_p_value([3.27], 3.28) != compare.one_sided_p_value([3.27], 3.28)  # nan for n = 1


def test_welch_two_sample_test_against_a_baseline(tmp_path, capsys):
    from scipy import stats
    configs = {"dense": (dict(num_experts=1), [3.2770, 3.2790, 3.2765, 3.2782]),
               "fine": (dict(num_experts=16, top_k=4, expert_hidden=192), [3.2601, 3.2644, 3.2610]),
               "same": (dict(num_experts=4, top_k=1), [3.2781, 3.2769, 3.2777])}
    for name, (hyper, finals) in configs.items():
        for i, v in enumerate(finals):
            our_log(tmp_path / f"{name}{i}.txt", [(0, 6.0, 0), (100, v, 1000 if name == "dense" else 1200)],
                    hyper=dict(batch_size=8, sequence_length=32, seed=i, **hyper))
    a, b = configs["fine"][1], configs["dense"][1]
    (ma, va), (mb, vb) = [(sum(x) / len(x), sum((y - sum(x) / len(x)) ** 2 for y in x) / (len(x) - 1)) for x in (a, b)]
    t = (ma - mb) / math.sqrt(va / len(a) + vb / len(b))  # Welch's statistic and Welch-Satterthwaite's df
    df = (va / len(a) + vb / len(b)) ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    p = 2 * stats.t.cdf(-abs(t), df)
    assert compare.welch_test(a, b) == pytest.approx((t, p))
    assert p < 0.01
    assert compare.main([str(tmp_path), "--baseline", "dense"]) == 0
    out = capsys.readouterr().out
    assert "| configuration vs dense (n=4) |" in out
    pairs = out.split("| configuration vs dense (n=4) |")[1]  # after the runs and groups tables
    fine_row = next(l for l in pairs.splitlines() if l.startswith("| moe E16 top4 H192"))
    # seeds 0, 1, 2 (data seed 0) on both sides: three matched pairs, dense's seed 3 unmatched
    paired = stats.ttest_rel(a, b[:3])
    diffs = [x - y for x, y in zip(a, b)]
    sd = math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2)
    low, high = paired.confidence_interval(0.95)
    assert fine_row == (f"| moe E16 top4 H192 learned renorm | 3 | {ma - mb:+.4f} | {p:.3g} | 3 | "
                        f"{sum(diffs) / 3:+.4f} ± {sd:.4f} | {paired.pvalue:.3g} | [{low:+.4f}, {high:+.4f}] | 0 / 1 | "
                        f"1.200 |")
    assert "warning: moe E16 top4 H192 learned renorm: 0 of its runs and 1 of dense's have no matched partner" in out
    same_row = next(l for l in pairs.splitlines() if l.startswith("| moe E4 top1"))
    assert float(same_row.split(" | ")[3]) > 0.05  # no difference to find there
    assert compare.main([str(tmp_path), "--baseline", "moe E16"]) == 0  # the start of one label
    assert "| configuration vs moe E16 top4 H192 learned renorm (n=3) |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        compare.main([str(tmp_path), "--baseline", "moe"])
    assert str(e.value) == ("error: --baseline 'moe' begins 2 labels; give a whole label, e.g. "
                            "'moe E16 top4 H192 learned renorm'; 'moe E4 top1 learned renorm'")
    assert compare.main([str(tmp_path), "--baseline", "dens"]) == 0  # a prefix of 'dense'
    with pytest.raises(SystemExit) as e:  # a part from the middle names nothing, but the closest are named
        compare.main([str(tmp_path), "--baseline", "top4"])
    assert str(e.value).startswith("error: --baseline 'top4' is no label; give a whole label, e.g. ")
    assert len(str(e.value).splitlines()) == 1


def test_branch_scale_of_a_null_bias_run_and_of_a_scaled_dense_run(tmp_path):
    hyper = dict(batch_size=8, sequence_length=32, num_experts=4, top_k=1, router_gate="renorm",
                 null_expert_bias=10.0)
    router = [f"step:100/100 router layer:{l} train_load:0.25,0.25,0.25,0.25 val_load:0.25,0.25,0.25,0.25 "
              f"max_violation:0 gate_mean:{g}" for l, g in [(0, 0.04), (1, 0.06)]]
    run = compare.parse_log(our_log(tmp_path / "null.txt", [(0, 6.0, 0), (100, 3.1, 990)], hyper=hyper, router=router))
    assert run.branch_scale == pytest.approx(0.05)
    dense = compare.parse_log(our_log(tmp_path / "d.txt", [(0, 6.0, 0), (100, 3.1, 990)],
                                      hyper=dict(batch_size=8, sequence_length=32, mlp_output_scale=0.05)))
    assert dense.mode == "dense scale0.05" and dense.branch_scale == 0.05
    assert compare.runs_table([run, dense], 3.28).splitlines()[2].endswith("| - | 0.05 |")


def test_logs_from_real_runs(shards, tmp_path):
    """The trainer's own logs (dense and MoE), read back: the table has their numbers."""
    for name, flags in [("dense", []), ("moe", ["--num_experts", "4", "--aux_loss_coef", "0.01"])]:
        result = run_trainer([*TINY, *data_flags(shards), *flags, "--num_iterations", "20", "--warmdown_iters", "5",
                              "--val_loss_every", "10", "--log_dir", str(tmp_path / name)])
        assert result.returncode == 0, result.stderr[-2000:]
    runs = compare.load_runs([str(tmp_path)])
    assert sorted(r.mode for r in runs) == ["dense", "moe E4 top1 learned renorm aux0.01"]
    for run in runs:
        assert run.finished and sorted(run.val) == [0, 10, 20] and run.tokens_per_step == 8 * 32
        assert math.isclose(run.val[0][0], math.log(128), abs_tol=1e-3) and run.final_val < run.val[0][0]
    moe = next(r for r in runs if r.router)
    assert sorted(moe.router) == [0, 10, 20] and sorted(moe.router[20]) == [0, 1]
    assert len(moe.router[20][1]["val_load"]) == 4
    out = tmp_path / "curves.png"
    compare.plot(runs, str(out), target=3.28)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    run = compare.parse_log(our_log(tmp_path / "r.txt", [(0, 6.0, 0), (100, 3.1, 990)]))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="--plot needs matplotlib: pip install matplotlib"):
        compare.plot([run], str(tmp_path / "x.png"), 3.28)


def test_new_fields_at_the_end_of_a_step_line_break_no_reader(tmp_path):
    """Train lines now end with lr_mult; a field added later must not hide the line either."""
    path = our_log(tmp_path / "r.txt", [(0, 6.0, 0), (100, 3.1, 990)])
    text = path.read_text().replace("step:100/100 val_loss:3.1000 train_time:990ms step_avg:11.00ms",
                                    "step:99/100 train_loss:3.2000 train_time:980ms step_avg:11.00ms lr_mult:0.0100\n"
                                    "step:100/100 train_loss:3.1500 train_time:985ms step_avg:11.00ms lr_mult:0.0000 "
                                    "tokens_per_s:1234\n"
                                    "step:100/100 val_loss:3.1000 train_time:990ms step_avg:11.00ms grad_norm:0.5")
    path.write_text(text)
    run = compare.parse_log(path)
    assert run.finished and run.final_val == 3.1 and run.train[99] == (3.2, 980.0, 11.0) and run.train[100][0] == 3.15


def test_every_committed_log_reads(capsys):
    """Our logs from before the lr_mult field (records/) read as finished runs with router lines where MoE."""
    runs = compare.load_runs([str(ROOT / "records")])
    assert "skipped" not in capsys.readouterr().err
    assert len(runs) >= 30 and all(run.finished for run in runs)
    assert all(run.router for run in runs if run.mode.startswith("moe"))


def test_a_router_without_a_gate_flag_is_labelled_without_one(tmp_path):
    hyper = dict(batch_size=8, sequence_length=32, num_experts=4, top_k=1, router="hash", router_gate="renorm")
    assert compare.parse_log(our_log(tmp_path / "h.txt", [(0, 6.0, 0)], hyper=hyper)).mode == "moe E4 top1 hash"
    foreign = dict(hyper, router="someone-elses")  # a router this checkout does not know: its settings all shown
    assert compare.parse_log(our_log(tmp_path / "f.txt", [(0, 6.0, 0)], hyper=foreign)).mode == \
        "moe E4 top1 someone-elses renorm"


def test_an_edited_script_is_another_configuration_even_with_the_same_flags(tmp_path):
    """The log begins with the code that ran: runs of an edited train_gpt2.py do not pool with the original's."""
    for i, (name, source) in enumerate([("a1", "print('original')"), ("a2", "print('original')"),
                                        ("b1", "print('tweaked')")]):
        path = our_log(tmp_path / f"{name}.txt", [(0, 6.0, 0), (100, 3.1 + i / 100, 990)])  # two runs, not copies
        path.write_text(path.read_text().replace("print('source')", source))
    grouped = compare.groups(compare.load_runs([str(tmp_path)]))
    assert sorted(len(m) for m in grouped.values()) == [1, 2]
    assert all(label.startswith("dense (code=") for label in grouped)


def test_a_field_an_older_log_lacks_counts_as_its_default(tmp_path):
    """Old logs predate some flags; their runs differ from new ones in the code, not in a missing setting."""
    old = our_log(tmp_path / "old.txt", [(0, 6.0, 0), (100, 3.1, 990)])
    old.write_text(old.read_text().replace("print('source')", "print('older')"))
    new = our_log(tmp_path / "new.txt", [(0, 6.0, 0), (100, 3.1, 990)],
                  hyper=dict(batch_size=8, sequence_length=32, num_experts=1, num_iterations=100, mlp_output_scale=1.0,
                             shared_expert_hidden=0))
    assert "mlp_output_scale" not in compare.parse_log(old).hyper
    labels = list(compare.groups(compare.load_runs([str(tmp_path)])))
    assert len(labels) == 2 and all(label.startswith("dense (code=") and label.count("=") == 1 for label in labels), labels
    other = our_log(tmp_path / "other.txt", [(0, 6.0, 0), (100, 3.1, 990)],
                    hyper=dict(batch_size=8, sequence_length=32, num_experts=1, num_iterations=100, mlp_output_scale=1.0,
                               muon_lr=0.03))
    other.write_text(other.read_text().replace("print('source')", "print('older')"))
    labels = list(compare.groups(compare.load_runs([str(tmp_path)])))
    assert any("muon_lr=0.03" in label for label in labels), labels  # a real difference still shows


def test_seeds_and_data_seeds_are_seeds_not_configurations(tmp_path):
    for i, (seed, data_seed) in enumerate([(1, 0), (2, 5), (3, 6)]):
        our_log(tmp_path / f"r{i}.txt", [(0, 6.0, 0), (100, 3.1 + i / 100, 990)],
                hyper=dict(batch_size=8, sequence_length=32, num_experts=1, seed=seed, data_seed=data_seed))
    our_log(tmp_path / "other.txt", [(0, 6.0, 0), (100, 3.0, 990)],
            hyper=dict(batch_size=8, sequence_length=32, num_experts=1, seed=1, data_seed=0, muon_lr=0.03))
    grouped = compare.groups(compare.load_runs([str(tmp_path)]))
    assert sorted(len(members) for members in grouped.values()) == [1, 3]
    assert {"seed", "data_seed"} <= compare.RUN_CONTROL


def test_pairs_show_the_sign_that_unmatched_runs_on_another_data_order_hide(tmp_path, capsys):
    """As in MoEvsTunedDenseCPU with its init-only runs added: the MoE is 0.02 below dense in every matched
    pair, but dense also has runs on the record's (easier) order that pull its pooled mean down."""
    def log(name, final, seed, data_seed, experts, order="sampled"):
        tail = f"training data: 3 shards, 100 tokens, order: {order}; validation: 10 tokens\n" if order else ""
        our_log(tmp_path / f"{name}.txt", [(0, 6.0, 0), (100, final, 1000 if experts == 1 else 1200)], tail=tail,
                hyper=dict(batch_size=8, sequence_length=32, num_experts=experts, seed=seed, data_seed=data_seed))
    dense = {1: 4.35, 2: 4.18, 3: 4.66}
    for seed, final in dense.items():
        log(f"dense{seed}", final, seed, seed, 1)
        log(f"moe{seed}", final - 0.02 + 0.001 * seed, seed, seed, 4)
    for seed in (101, 102, 103):
        log(f"dense_record{seed}", 4.10, seed, 0, 1, order="record")
    log("moe_older_loader", 4.0, 1, 1, 4, order=None)  # data seed 1 read another way: no partner
    assert compare.main([str(tmp_path), "--baseline", "dense"]) == 0
    out = capsys.readouterr().out
    row = next(l for l in out.split("| configuration vs dense")[1].splitlines() if l.startswith("| moe"))
    cells = row.split(" | ")
    assert float(cells[2]) > 0 and cells[4] == "3" and cells[5].startswith("-0.0180 ±")  # pooled +, paired -
    assert cells[8] == "1 / 3"  # the older loader's MoE run and the three record-order dense runs
    assert ("the runs read 3 on sampled orders, 1 on windows orders against 3 on record order, 3 on sampled "
            "orders, so the unpaired difference mixes the data with the configurations") in out


def test_the_comparison_at_its_edges(tmp_path):
    """A side of one run, a baseline of one finished run, an unfinished run (left out of Welch's test), two
    configurations whose short labels would collide, and a step_avg that is not a number."""
    from scipy import stats

    def dense(name, seed, final, muon_lr=0.02, warmup=0, finished=True, nan_avg=False):
        hyper = dict(batch_size=8, sequence_length=32, num_experts=1, num_iterations=100, seed=seed,
                     data_seed=seed, muon_lr=muon_lr, head_lr=0.002 * muon_lr / 0.02, embed_lr=0.3 * muon_lr / 0.02,
                     warmup_iters=warmup)
        vals = [(0, 6.0, 0)] + ([(100, final, 0 if nan_avg else 900)] if finished else [(50, final, 450)])
        return our_log(tmp_path / f"{name}.txt", vals, hyper=hyper)
    for seed, final in zip((1, 2, 3), (3.30, 3.32, 3.31)):
        dense(f"base{seed}", seed, final)
    dense("base_unfinished", 4, 2.0, finished=False)  # stopped at step 50: not in any statistic
    for seed, final in zip((1, 2, 3), (3.25, 3.28, 3.24)):
        dense(f"warm{seed}", seed, final, warmup=5)  # agrees with base on the first three settings that differ
    dense("fast1", 1, 3.20, muon_lr=0.04, warmup=5, nan_avg=True)  # one run, step_avg nan
    runs = compare.load_runs([str(tmp_path)])
    labels = list(compare.groups(runs))
    assert len(labels) == len(set(labels)) == 3  # the colliding label got a suffix instead of merging runs
    base = next(l for l in labels if "muon_lr=0.02" in l and "#" not in l)
    warm = next(l for l in labels if l.startswith(base) and "#" in l)
    table = compare.comparison_table(runs, base)
    row = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    welch = stats.ttest_ind([3.25, 3.28, 3.24], [3.30, 3.32, 3.31], equal_var=False)
    assert row[warm][3] == f"{welch.pvalue:.3g}" and row[warm][4] == "3"  # 3 base runs, not 4: unfinished out
    assert row[warm][8] == "0 / 0"
    fast = next(l for l in labels if "muon_lr=0.04" in l)
    assert row[fast][1:5] == ["1", f"{3.20 - (3.30 + 3.32 + 3.31) / 3:+.4f}", "-", "1"]  # one run: no test
    assert row[fast][6:8] == ["-", "-"] and row[fast][9].strip(" |") == "-"  # no paired test; nan step_avg: no ratio
    subset = [r for r in runs if r.path.name in ("base1.txt", "warm1.txt", "warm2.txt")]
    one = compare.comparison_table(subset, "dense (warmup_iters=0)")  # a baseline of one finished run
    cells = one.splitlines()[2].split(" | ")
    assert cells[1:5] == ["2", f"{(3.25 + 3.28) / 2 - 3.30:+.4f}", "-", "1"] and "nan" not in one

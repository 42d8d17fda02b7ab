"""bench.py: its FLOP count, its graph-health counters (they must see breaks and recompiles), a short run."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

import bench  # noqa: E402
from train_gpt2 import Hyperparameters  # noqa: E402


def test_flops_per_token_counts_active_parameters():
    dense = bench.flops_per_token(Hyperparameters(), 1024)
    # GPT-2 small with an untied head: 85M block parameters + 38.6M head, then attention
    assert dense == 6 * (12 * 12 * 768 ** 2 + 50304 * 768) + 12 * 12 * 768 * 1024
    assert dense / 1e6 == pytest.approx(854.65, abs=0.01)
    moe1 = bench.flops_per_token(Hyperparameters(num_experts=4), 1024)
    assert moe1 - dense == 6 * 12 * 768 * 4  # top-1: the same active parameters, plus the routers
    moe2 = bench.flops_per_token(Hyperparameters(num_experts=4, top_k=2), 1024)
    assert moe2 - moe1 == 6 * 12 * 8 * 768 ** 2  # a second expert per token
    assert bench.flops_per_token(Hyperparameters(num_experts=4, router="hash"), 1024) == dense
    # fine-grained and shared experts at the dense MLP's active width: only the routers add
    fine = bench.flops_per_token(Hyperparameters(num_experts=16, top_k=4, expert_hidden=768), 1024)
    shared = bench.flops_per_token(Hyperparameters(num_experts=16, top_k=3, expert_hidden=768, shared_expert_hidden=768), 1024)
    assert fine - dense == shared - dense == 6 * 12 * 768 * 16
    wider = bench.flops_per_token(Hyperparameters(num_experts=16, top_k=4, expert_hidden=768, shared_expert_hidden=768), 1024)
    assert wider - fine == 6 * 12 * 2 * 768 * 768  # a shared expert of width 768 on top


def test_graph_health_counts_breaks_and_recompiles():
    torch._dynamo.reset()

    def clean(x):
        return (x * 2).sin()

    def breaking(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y.sin()

    x = torch.randn(8)
    compiled = torch.compile(clean, dynamic=False)
    health = bench.count_graph_health(lambda: compiled(x), warmup_calls=1, more_calls=2)
    assert (health["graph_breaks"], health["recompiles"]) == (0, 0)
    torch._dynamo.reset()
    compiled = torch.compile(breaking, dynamic=False)
    assert bench.count_graph_health(lambda: compiled(x), 1, 1)["graph_breaks"] >= 1
    torch._dynamo.reset()
    compiled = torch.compile(clean, dynamic=False)
    shapes = iter([8, 9, 10, 11])
    health = bench.count_graph_health(lambda: compiled(torch.randn(next(shapes))), warmup_calls=1, more_calls=2)
    assert health["recompiles"] >= 1  # a new shape after the first call


def test_peak_tflops_by_device_name():
    assert bench.device_peak_tflops(torch.device("cpu")) is None
    names = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.4}
    for name, peak in names.items():
        assert next(p for key, p in bench.PEAK_TFLOPS if key in name) == peak


def test_a_short_cpu_run_times_dense_the_seeds_moe_and_another_design(tmp_path):
    out = tmp_path / "bench.json"
    extra = "--num_experts 16 --top_k 3 --expert_hidden 64 --shared_expert_hidden 64"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--steps", "2", "--warmup", "1",
                             "--device_batch_size", "2", "--json", str(out), "--extra_moe", extra],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("| measure | dense | MoE (E4 top-1) | E16 top-3 H64 S64 | MoE (E4 top-1)/dense | "
            "E16 top-3 H64 S64/dense |") in result.stdout
    assert "| train step (ms, median) |" in result.stdout and "| projected 8-rank step (ms) |" in result.stdout
    figures = json.loads(out.read_text())
    assert figures["meta"]["torch"] == torch.__version__ and figures["meta"]["size"] == "tiny"
    assert figures["meta"]["models"] == ["dense", "moe", "E16 top-3 H64 S64"] and figures["meta"]["complete"]
    for mode, r in figures["results"].items():
        assert all(r[k] > 0 for k in ("step_ms", "fwd_bwd_ms", "optimizer_ms", "muon_ms", "adam_ms", "layer_ms",
                                      "tokens_per_s"))
        # the projection: forward and backward, Adam, and the busiest rank's share of Muon
        assert r["projected_8_rank_ms"] == pytest.approx(r["fwd_bwd_ms"] + r["adam_ms"] + r["muon_ms"] * r["ns_share_8_ranks"])
        assert 1 / 8 <= r["ns_share_8_ranks"] < 0.5, mode  # 2 layers' matrices spread over 8 ranks
        line = f"{mode}/dense: train step {figures['ratios'][mode]['step_ms']:.3f}x" if mode != "dense" else mode
        assert line in result.stdout
    dense, moe, fine = (figures["results"][m] for m in figures["meta"]["models"])
    assert moe["params"] > 1.5 * dense["params"]
    assert figures["ratios"]["moe"]["step_ms"] == pytest.approx(moe["step_ms"] / dense["step_ms"])
    assert figures["ratios"]["E16 top-3 H64 S64"]["fwd_bwd_ms"] == pytest.approx(fine["fwd_bwd_ms"] / dense["fwd_bwd_ms"])
    # the active width 3 x 64 + 64 = 4 x 64: the dense model's FLOPs, plus the routers' (2 layers, 64 wide, 16)
    assert fine["flops_per_token"] - dense["flops_per_token"] == 6 * 2 * 64 * 16


def test_each_models_compiled_figures_are_written_before_anything_else_is_tried(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"

    def layer_fails(*args):
        raise RuntimeError("out of memory in the layer probe")
    monkeypatch.setattr(bench, "bench_layer", layer_fails)
    with pytest.raises(RuntimeError, match="layer probe"):
        bench.main(["--steps", "1", "--warmup", "1", "--device_batch_size", "1", "--n_layer", "1", "--n_embd", "64",
                    "--n_head", "1", "--vocab_size", "256", "--sequence_length", "32", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert list(figures["results"]) == ["dense"] and not figures["meta"]["complete"]
    assert figures["results"]["dense"]["step_ms"] > 0 and figures["results"]["dense"]["projected_8_rank_ms"] > 0


def test_the_loader_bench_times_both_orders_at_the_flags_batch(shards, capsys):
    figures = bench.main(["--loader", str(shards / "synthetic_train_*.bin"), "--loader_ranks", "2", "--steps", "5",
                          "--device_batch_size", "4", "--sequence_length", "32"])
    out = capsys.readouterr().out
    assert "data loader, rank 0 of 2, 4 x 32 tokens a batch" in out
    assert set(figures) == {"record", "sampled"} and all(f["batch_ms"] > 0 for f in figures.values())
    assert figures["sampled"]["sequences"] == 2 * ((20_000 - 1) // 32)  # two shards of 20k tokens
    assert f"then {figures['sampled']['batch_ms']:.3f} ms a batch (median of 5); 1,248 sequences" in out

"""The shell launchers, run the way the README runs them."""
import os
import subprocess

from conftest import ROOT, run_log, val_losses
from compare import parse_step_line


def launch(script, *args, nproc=2, timeout=300):
    env = {**os.environ, "NPROC": str(nproc), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def short_smoke_run(script, tmp_path):
    """40 steps of the script's smoke preset on 2 ranks; the launcher's result and the run log's lines."""
    result = launch(script, "--smoke", "--num_iterations", "40", "--warmdown_iters", "10",
                    "--val_loss_every", "20", "--log_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    _, lines = run_log(tmp_path)
    val = val_losses(lines)
    assert sorted(val) == [0, 20, 40]
    assert abs(val[0] - 6.2383) < 1e-3 and val[40] < 4.2, val  # ln(512), then two nats below it
    return result, lines


def test_dense_smoke_run_learns(tmp_path):
    result, lines = short_smoke_run("run_dense.sh", tmp_path)
    assert "world_size:2" in result.stdout and "n_layer': 2" in "\n".join(lines)
    assert any(s and s.kind == "val" for s in map(parse_step_line, result.stdout.splitlines()))


def test_a_bad_flag_stops_before_launch_with_one_line(tmp_path):
    result = launch("run_dense.sh", "--smoke", "--batch_size", "12", "--log_dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --batch_size 12 is not a multiple of --device_batch_size 4 x 2 ranks = 8; change either")
    assert "torch.distributed" not in result.stderr and not list(tmp_path.iterdir())


def test_moe_smoke_run_learns_and_reports_routers(tmp_path):
    result, lines = short_smoke_run("run_moe.sh", tmp_path)
    hyper = next(l for l in lines if l.startswith("hyperparameters: "))
    for setting in ["'num_experts': 4", "'top_k': 1", "'router': 'learned'", "'router_gate': 'renorm'",
                    "'aux_loss_coef': 0.01", "'null_expert_bias': 0.0"]:
        assert setting in hyper
    assert len([l for l in lines if l.startswith("step:40/40 router layer:")]) == 2

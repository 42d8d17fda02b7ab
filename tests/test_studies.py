"""The analyses in records/ compute the estimands their READMEs define (hand-made losses, known answers)."""
import importlib.util
import math

import pytest

from conftest import ROOT


def load(study: str):
    spec = importlib.util.spec_from_file_location(f"analyze_{study}", ROOT / "records" / study / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


horizon = load("2026-12-07_HorizonCPU")
DENSE = {1000: 3.50, 1250: 3.40, 1500: 3.34}  # dense's final val loss at each length of one pair


@pytest.mark.parametrize("moe, steps", [(3.50, 1000), (3.40, 1250), (3.34, 1500)])
def test_a_moe_that_equals_a_dense_length_is_worth_that_length(moe, steps):
    assert horizon.dense_step_equivalent(moe, DENSE) == (pytest.approx(steps), False)


def test_the_equivalent_is_linear_in_log_steps_between_the_bracketing_lengths():
    D, censored = horizon.dense_step_equivalent(3.45, DENSE)  # halfway between 1000 and 1250
    assert not censored and D == pytest.approx(math.sqrt(1000 * 1250))
    D, _ = horizon.dense_step_equivalent(3.37, DENSE)  # halfway between 1250 and 1500: 1500 is used here
    assert D == pytest.approx(math.sqrt(1250 * 1500))


def test_a_moe_below_dense_longest_run_is_censored_and_one_above_the_shortest_extrapolates():
    assert horizon.dense_step_equivalent(3.30, DENSE) == (1500.0, True)
    assert horizon.dense_step_equivalent(3.30, {1000: 3.50, 1250: 3.40}) == (1250.0, True)
    D, censored = horizon.dense_step_equivalent(3.55, DENSE)  # half a step of 1000 -> 1250 above dense at 1000
    assert not censored and D == pytest.approx(1000 / math.sqrt(1250 / 1000))


def test_a_lead_that_grows_by_a_known_slope_is_fitted_tested_and_carried_to_the_speedrun(monkeypatch, tmp_path):
    """Dense's loss linear in log(steps) (then D is exact); the MoE at N worth r(N) = 1.05 + 0.02 log2(N / 500)
    dense steps, give or take a few thousandths per pair and horizon."""
    noise = {(p, N): 0.004 * ((p * 7 + N // 500 * 3) % 5 - 2) for p in (11, 12, 13, 14) for N in (500, 1000, 2000)}
    losses = {}
    for (p, N), e in noise.items():
        dense = lambda steps: 6.0 + 0.01 * p - 0.3 * math.log(steps)  # noqa: E731
        for L in (N, N * 5 // 4):
            losses["dense", L, p] = dense(L)
        losses["moe", N, p] = dense(N * (1.05 + 0.02 * math.log2(N / 500) + e))
    monkeypatch.setattr(horizon, "losses", lambda: losses)
    horizon.main(["--json", str(tmp_path / "results.json"), "--plot", str(tmp_path / "trend.png")])
    assert (tmp_path / "trend.png").read_bytes().startswith(b"\x89PNG")
    results = __import__("json").loads((tmp_path / "results.json").read_text())
    for N in (500, 1000, 2000):
        expected = [1.05 + 0.02 * math.log2(N / 500) + noise[p, N] for p in (11, 12, 13, 14)]
        assert results["horizons"][str(N)]["r_mean"] == pytest.approx(sum(expected) / 4)
        assert results["horizons"][str(N)]["dense_gain_of_25pct"] == pytest.approx(-0.3 * math.log(1.25))
    growth = results["growth"]
    assert growth["pairs"] == [11, 12, 13, 14] and growth["mean"] == pytest.approx(0.04, abs=0.01)
    assert growth["verdict"] == "grows" and growth["p"] < 0.05
    trend = results["trend"]
    assert trend["points"] == 12 and trend["slope_low"] < 0.02 < trend["slope_high"]
    doublings = math.log2(horizon.SPEEDRUN_TOKENS / (2000 * horizon.TOKENS_PER_STEP))
    assert trend["doublings_beyond_data"] == pytest.approx(doublings)
    assert trend["at_speedrun_low"] < 1.09 + 0.02 * doublings < trend["at_speedrun_high"]
    beyond = math.log2(horizon.SAME_TOKENS_PER_PARAM / (2000 * horizon.TOKENS_PER_STEP))
    assert trend["at_same_tokens_per_param_low"] < 1.09 + 0.02 * beyond < trend["at_same_tokens_per_param_high"]
    assert horizon.SAME_TOKENS_PER_PARAM == pytest.approx(28.3 * 4 * 12 * 128 ** 2, rel=0.01)  # 22M tokens

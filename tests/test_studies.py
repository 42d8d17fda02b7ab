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

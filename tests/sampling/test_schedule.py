import numpy as np
import pytest

from tfmq.errors import TfmqError
from tfmq.sampling import timestep_schedule


def test_uniform_skip_matches_the_ddim_paper():
    np.testing.assert_array_equal(timestep_schedule(1000, 10, "uniform"), np.arange(900, -1, -100))


def test_quadratic_skip_is_dense_near_zero_and_ends_at_zero():
    steps = timestep_schedule(1000, 100, "quad")
    assert len(steps) == 100 and len(np.unique(steps)) == 100
    assert steps[-1] == 0 and steps[0] == 800
    gaps = -np.diff(steps)
    assert gaps[-1] < gaps[0]
    np.testing.assert_array_equal(steps[-5:], [4, 3, 2, 1, 0])  # the paper's repeats moved up, not dropped


def test_bad_step_counts_are_errors():
    with pytest.raises(TfmqError):
        timestep_schedule(1000, 0)
    with pytest.raises(TfmqError):
        timestep_schedule(1000, 1001, "uniform")
    with pytest.raises(TfmqError, match="skip type"):
        timestep_schedule(1000, 10, "cubic")

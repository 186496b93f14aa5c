"""DecodeStep's host state on the CPU: StepLengths, advanced one token per step in O(1) NumPy calls, must
agree with the flush rule (layout.full_pages) at every step, for ragged batches, windows equal to the page
size or several pages long, and sequences starting empty, just below a flush, and exactly at one."""

from __future__ import annotations

import numpy as np
import pytest

from million_cupy.layout import full_pages
from million_cupy.step import StepLengths


@pytest.mark.parametrize("P,R", [(16, 16), (16, 32), (64, 128), (32, 96)])
def test_step_lengths_follow_the_flush_rule(rng, P, R):
    n = np.concatenate([[0, 1, R - 1, R, R + P - 1, 5 * P], rng.integers(0, 40 * P, 10)]).astype(np.int64)
    limit = n + rng.integers(1, 6 * P, n.shape[0])
    pos = np.zeros((n.shape[0], 4), np.int32)[:, 1]  # a strided view, as the append kernel's words are
    state = StepLengths(pos, n, 1, P, R, limit)
    for k in range(4 * R + 7):
        end = n + k + 1
        main = full_pages(end, P, R) * P
        np.testing.assert_array_equal(state.pos, n + k)
        np.testing.assert_array_equal(state.main, main)
        np.testing.assert_array_equal(state.res, end - main)
        assert state.flushed == int((full_pages(end, P, R) - full_pages(end - 1, P, R)).sum())
        assert state.steps_left == int((limit - end).min())
        assert 1 <= state.to_flush <= R
        state.advance()


def test_attention_only_steps_take_no_fast_path(rng):
    n = np.array([3, 200], np.int64)
    state = StepLengths(np.zeros(2, np.int32), n, 0, 64, 128, n + 100)
    assert state.steps_left == 0 and state.flushed == 0
    np.testing.assert_array_equal(state.main + state.res, n)


def test_step_lengths_keep_their_counts_in_the_arrays_given():
    """DecodeStep keeps a step's counts in views of its attention plan's step words (one staging copy per plan):
    the state must write through them, never replace them."""
    words = np.zeros(12, np.int32)
    main, res, pos = words[0:2], words[4:6], np.zeros(2, np.int32)
    n = np.array([63, 200])
    state = StepLengths(pos, n, 1, 64, 128, n + 100, main=main, res=res)
    assert state.main is main and state.res is res
    np.testing.assert_array_equal(words[[0, 1, 4, 5]], [0, 128, 64, 73])  # 64 tokens: none in pages yet
    for _ in range(65):
        state.advance()
    np.testing.assert_array_equal(main, [64, 192])  # 129 and 266 tokens: 1 and 3 pages ((n - 128) // 64 + 1)
    np.testing.assert_array_equal(res, [65, 74])

"""The background batch prefetcher: same batches, resumable state, errors surface."""

import numpy as np
import pytest

from chameleon_jax.prefetch import Prefetcher


class Counter:
    """A resumable source whose batch k is [k, k] and which fails at `fail_at`."""

    def __init__(self, fail_at: int = -1):
        self.k = 0
        self.fail_at = fail_at

    def state(self):
        return {"k": self.k}

    def restore(self, state):
        self.k = state["k"]

    def next_local(self):
        if self.k == self.fail_at:
            raise ValueError(f"document {self.k} is corrupt")
        self.k += 1
        return {"x": np.full(2, self.k - 1)}


def test_prefetched_batches_and_state_match_the_plain_source():
    plain, ahead = Counter(), Prefetcher(Counter(), depth=3)
    for _ in range(5):
        assert plain.next_local()["x"].tolist() == ahead.next_local()["x"].tolist()
        # The state is the one after the batch handed out, though more were built ahead.
        assert ahead.state() == plain.state()
    ahead.close()
    assert ahead.source.state() == plain.state()  # closing rewinds the source to what was handed out


def test_restore_resumes_at_the_next_unseen_batch():
    first = Prefetcher(Counter(), depth=2)
    seen = [int(first.next_local()["x"][0]) for _ in range(3)]
    saved = first.state()
    later = [int(first.next_local()["x"][0]) for _ in range(2)]
    first.close()
    resumed = Prefetcher(Counter(), depth=2)
    resumed.restore(saved)
    assert seen == [0, 1, 2]
    assert [int(resumed.next_local()["x"][0]) for _ in range(2)] == later == [3, 4]
    resumed.close()


def test_an_error_in_the_worker_is_raised_in_the_consumer():
    p = Prefetcher(Counter(fail_at=2), depth=2)
    assert int(p.next_local()["x"][0]) == 0
    assert int(p.next_local()["x"][0]) == 1
    with pytest.raises(ValueError, match="document 2 is corrupt"):
        p.next_local()


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="prefetch depth"):
        Prefetcher(Counter(), depth=0)

"""The evaluations record what a decoding costs: forward passes and seconds per picture."""

import types

import pytest

from eval import common
from eval.t2i import decode_cost


class CountingPipe:
    """A stand-in pipeline: each batch takes as many passes as its longest prompt has characters."""

    codes_per_image = 4

    def encode_prompt(self, prompt):
        return list(prompt[0])

    def __init__(self):
        self.calls = []

    def generate_ids(self, ids, seed, stream_ids, **kwargs):
        self.calls.append((seed, list(stream_ids), len(ids)))
        longest = max(len(x) for x in ids)
        return types.SimpleNamespace(tokens=[list(x) for x in ids], steps=longest, prompt_len=16 * -(-longest // 16))

    def segments_of_rows(self, rows):
        return rows


def test_generate_all_records_rows_passes_and_seconds_per_batch():
    cfg = common.EvalConfig(batch_size=2)
    timings: list = []
    prompts = [["ab"], ["abcd"], ["a"], ["abc"], ["ab"]]
    pipe = CountingPipe()
    out = common.generate_all(pipe, prompts, cfg, "test", timings=timings, modality="image")
    assert out == [list(p[0]) for p in prompts]
    # The short last batch runs at the full batch's shape; its filler row is dropped from the results.
    assert [(rows, passes, shape) for rows, passes, _, shape in timings] == [(2, 4, (2, 16)), (2, 3, (2, 16)),
                                                                            (1, 2, (2, 16))]
    assert all(seconds >= 0 for _, _, seconds, _ in timings)


def test_a_short_last_batch_is_filled_with_copies_of_its_last_row_on_that_rows_stream():
    cfg = common.EvalConfig(batch_size=4, seed=7)
    pipe = CountingPipe()
    prompts = [["ab"], ["abc"], ["a"], ["abcd"], ["abcde"], ["b"]]
    out = common.generate_all(pipe, prompts, cfg, "test", modality="image")
    assert out == [list(p[0]) for p in prompts]
    # Copies share the copied row's stream, so with sampling they draw what it draws.
    assert pipe.calls == [(7, [0, 1, 2, 3], 4), (8, [0, 1, 1, 1], 4)]
    single = CountingPipe()  # a single batch is not filled up: no full-size loop was compiled to reuse
    assert common.generate_all(single, prompts[:3], cfg, "test", modality="image") == [list(p[0]) for p in prompts[:3]]
    assert single.calls == [(7, [0, 1, 2], 3)]


def test_decode_cost_weights_passes_by_rows_and_leaves_out_compiling_batches():
    # The first batch of each compiled shape (rows, padded prompt length) compiles the loop.
    timings = [(4, 10, 9.0, (4, 16)), (4, 6, 2.0, (4, 16)), (4, 8, 8.0, (4, 32)), (4, 8, 4.0, (4, 32)),
               (2, 5, 7.0, (2, 16))]
    cost = decode_cost("t2i_seen", timings)
    assert cost["t2i_seen_forward_passes_per_image"] == pytest.approx((40 + 24 + 32 + 32 + 10) / 18)
    assert cost["t2i_seen_seconds_per_image"] == pytest.approx(6.0 / 8)
    one = decode_cost("x", [(3, 7, 3.0, (3, 16))])  # a single batch is all there is to time
    assert one == {"x_forward_passes_per_image": 7.0, "x_seconds_per_image": 1.0}

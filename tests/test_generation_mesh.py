"""Generation on a device mesh (8 fake CPU devices) chooses the tokens one device chooses.

One model (4 query heads, 2 key/value heads) is steered to write text, open an image
at a fixed position, and write text again; each mesh runs that mixed call with
three-stream guidance (greedy text, seeded image sampling) and an image call with
two-stream guidance, and must match the single-device tokens. The meshes cover pure
data parallelism, tensor parallelism with heads split, all three axes, and a tensor
axis wider than the key/value heads (which then stay replicated).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from chameleon_jax.config import MeshConfig
from chameleon_jax.kv_cache import CACHE_AXES
from chameleon_jax.pipeline import Pipeline
from chameleon_jax.sharding import constrain, use_mesh
from tests.test_generation_fixtures import (
    BOI, BOS, CODES_PER_IMAGE as K, EOI, Biased, PatchTokenizer, bias_at, tiny_model, toy_vocab,
)

VOCAB = toy_vocab()
MESHES = {
    "data8": MeshConfig(data=8),
    "data2_tensor4": MeshConfig(data=2, tensor=4),
    "data2_fsdp2_tensor2": MeshConfig(data=2, fsdp=2, tensor=2),
    "tensor8": MeshConfig(data=1, tensor=8),
}
IMAGE_AT = 12  # the steered model opens an image at this position
SAMPLING = dict(temperature=0.0, image_temperature=1.0, seed=11)


def ids(text: str) -> list[int]:
    return [BOS] + VOCAB.encode_text(text)


PROMPTS = [ids("hi"), ids("a cat"), ids("the dog")]  # 3 prompts: padded to the row shards


def steered_model():
    return Biased(tiny_model(num_heads=4, num_kv_heads=2), bias_at(64, {IMAGE_AT: BOI}))


def run_calls(pipe, prompts=PROMPTS) -> dict[str, list[list[int]]]:
    mixed = pipe.generate_ids(prompts, modality="any", max_new_tokens=IMAGE_AT + K + 6, cfg_image_scale=1.5,
                              cfg_text_scale=2.0, **SAMPLING).tokens
    image = pipe.generate_ids(prompts, modality="image", max_new_tokens=K + 2, cfg_scale=3.0, **SAMPLING).tokens
    return {"mixed": mixed, "image": image}


@pytest.fixture(scope="module")
def single_device():
    return run_calls(Pipeline.from_parts(steered_model(), VOCAB, PatchTokenizer()))


def test_reference_calls_write_text_an_image_and_text_again(single_device):
    for prompt, row in zip(PROMPTS, single_device["mixed"]):
        start = row.index(BOI)
        assert start == IMAGE_AT - len(prompt) and start > 0  # text first
        assert row[start + K + 1] == EOI and len(row) > start + K + 2  # a whole image, then text
        assert all(VOCAB.image_token_mask[t] for t in row[start + 1 : start + 1 + K])
    assert len({tuple(r) for r in single_device["image"]}) == len(PROMPTS)  # sampled: the rows differ


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_generates_the_single_device_tokens(name, single_device):
    pipe = Pipeline.from_parts(steered_model(), VOCAB, PatchTokenizer(), mesh=MESHES[name])
    assert pipe.mesh.size == 8
    assert run_calls(pipe) == single_device


@pytest.mark.slow
def test_greedy_jacobi_image_decoding_on_a_mesh_gives_the_single_device_sequential_tokens():
    kw = dict(modality="any", max_new_tokens=IMAGE_AT + K + 6, cfg_image_scale=1.5, cfg_text_scale=2.0,
              temperature=0.0, image_temperature=0.0)
    sequential = Pipeline.from_parts(steered_model(), VOCAB, PatchTokenizer()).generate_ids(PROMPTS, **kw).tokens
    pipe = Pipeline.from_parts(steered_model(), VOCAB, PatchTokenizer(), mesh=MESHES["data2_tensor4"])
    jacobi = pipe.generate_ids(PROMPTS, image_decoding="jacobi", jacobi_window=4, **kw).tokens
    assert jacobi == sequential
    assert all(row.count(BOI) == 1 and row[row.index(BOI) + K + 1] == EOI for row in sequential)  # an image each


def test_parameters_and_kv_cache_are_split_over_the_mesh():
    pipe = Pipeline.from_parts(tiny_model(num_heads=4, num_kv_heads=2), VOCAB, mesh=MESHES["data2_fsdp2_tensor2"])
    wk = pipe.model.blocks[0].attn.wk_dkh[...]  # [embed 32, kv_heads 2, head_dim 16]
    assert wk.sharding.spec == P("fsdp", "tensor", None)
    assert {s.data.shape for s in wk.addressable_shards} == {(16, 1, 16)}
    head = pipe.model.lm_head.w_dv[...]  # [embed 32, vocab 64]
    assert {s.data.shape for s in head.addressable_shards} == {(16, 32)}

    def cache_of(pipe, batch: int):
        with use_mesh(pipe.mesh, pipe.rules):
            return jax.jit(lambda: jax.tree.map(lambda a: constrain(a, CACHE_AXES), pipe.model.init_cache(batch, 24)))()

    k = cache_of(pipe, 8).k[0]  # [rows 8, kv_heads 2, slots 24, head_dim 16]
    assert k.sharding.spec == P(("data", "fsdp"), "tensor")
    assert {s.data.shape for s in k.addressable_shards} == {(2, 1, 24, 16)}
    # Two key/value heads on a 4-way tensor axis: the heads stay whole, the rows still split.
    wide = Pipeline.from_parts(tiny_model(num_heads=4, num_kv_heads=2), VOCAB, mesh=MeshConfig(data=2, tensor=4))
    k = cache_of(wide, 8).k[0]
    assert k.sharding.spec == P("data")
    assert {s.data.shape for s in k.addressable_shards} == {(4, 2, 24, 16)}


def test_rows_are_padded_to_whole_prompts_per_shard_and_dropped_after():
    pipe = Pipeline.from_parts(tiny_model(), VOCAB, mesh=MESHES["data8"])
    out = pipe.generate_ids([ids("x")], modality="text", max_new_tokens=3, ignore_eos=True)
    assert len(out.tokens) == 1 and len(out.tokens[0]) == 3
    np.testing.assert_array_equal(out.tokens, Pipeline.from_parts(tiny_model(), VOCAB).generate_ids(
        [ids("x")], modality="text", max_new_tokens=3, ignore_eos=True).tokens)

"""The compiled decode loop: one prefill, then a `lax.while_loop` of one-token steps.

Everything after the host builds the padded prompt batch runs in one jitted
function: the prefill writes the prompts into a fixed-size KV cache, and each
loop step feeds every row the token it chose last, reads one row of logits,
applies guidance, the row's text/image mode and its sampling settings, and
picks the next token. Modes switch inside the loop (no re-prefill, no Python
per token); the loop stops when every row is done.

Cache layout (S = P + limit slots per row, the same for every row):

  slots [0, P)          the left-padded prompt (kv_mask False on padding)
  slot  P + i - 1       generated token i - 1, written when step i feeds it

A row sees its prompt plus the generated slots from `first_r` on: P for the
conditional rows, the current image's `<boi>` slot for guidance rows (S, i.e.
none, before their first image). Positions are `cumsum(prompt mask) - 1` on
the prompt and continue from the prompt's length at `first_r`.

One compile per (model graph, rows, padded prompt length, DecodeSpec); jax's
jit cache keys on exactly those, so repeated calls of the same shape reuse it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chameleon_jax.generation import guidance as guidance_lib
from chameleon_jax.generation import jacobi
from chameleon_jax.generation import modes
from chameleon_jax.generation import placement as placement_lib
from chameleon_jax.generation import sampling
from chameleon_jax.generation.guidance import Guidance
from chameleon_jax.generation.sampling import SamplingParams
from chameleon_jax.image_positions import image_index
from chameleon_jax.transformer import Transformer, unstack_layers


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """What the compiled loop is specialised on (hashable: a jit static argument)."""

    limit: int  # tokens to generate at most (max_new_tokens, cut to the context left)
    codes_per_image: int  # 0 = this model cannot open images
    modality: str  # text | image | any
    form: str  # guidance form: none | two | three
    use_top_k: bool
    use_top_p: bool
    use_sampling: bool  # False when both modalities are greedy: no random draws at all
    return_logits: bool
    jacobi_window: int = 0  # image drafts verified per forward pass (jacobi.py); 0 = sequential image decoding
    jacobi_init: str = "uniform"  # fresh drafts: jacobi.INITS


class DecodeParams(NamedTuple):
    """Per-call numbers the loop reads as data (changing them never recompiles)."""

    text_temperature: jax.Array
    text_top_k: jax.Array
    text_top_p: jax.Array
    image_temperature: jax.Array
    image_top_k: jax.Array
    image_top_p: jax.Array
    guidance_scales: jax.Array  # float32 [3]: (s, s_img, s_txt)
    row_ids_b: jax.Array | None = None  # int32 [B]: each row's random stream (default: its index)


@dataclasses.dataclass
class DecodeResult:
    """Generated ids per prompt (the stop token included, no padding) and loop facts."""

    tokens: list[list[int]]
    steps: int  # loop iterations run, the prefill's token included
    prompt_len: int  # padded prompt length P the loop ran with
    cache_len: int  # S = P + limit, plus the W slots a last Jacobi window may write past the limit
    logits: np.ndarray | None = None  # float32 [B, limit, V]: the logits each token was chosen from, pre-mask


def prompt_bucket(length: int) -> int:
    """Padded prompt length: powers of two from 16, then multiples of 512 (few compiles, little waste)."""
    if length <= 1024:
        return max(16, 1 << math.ceil(math.log2(max(length, 1))))
    return 512 * math.ceil(length / 512)


class FrozenModel(NamedTuple):
    """A model split once for generation: what `generate_tokens` would otherwise split on every call.

    `nnx.split` walks the module graph in Python on each call (a few milliseconds
    for the `small` preset); a frozen model skips it. Its state holds the model's
    own variables, so values updated in place (`nnx.update`, an optimizer step)
    are used; after replacing variables or submodules, freeze again. A model with
    stacked blocks (`scan_layers`) is frozen unstacked (`transformer.unstack_layers`):
    that copy holds arrays of its own, so freeze again after updating its weights.
    """

    graphdef: object
    state: object
    cfg: object


def freeze(model) -> FrozenModel:
    if isinstance(model, Transformer):
        model = unstack_layers(model)
    graphdef, state = nnx.split(model)
    return FrozenModel(graphdef, state, model.cfg)


def model_context(model) -> int:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    return int(cfg.max_seq_len)


def model_vocab_size(model) -> int:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    return int(cfg.vocab_size)


def plan_lengths(prompt_lens: Sequence[int], *, max_new_tokens: int, context: int, modality: str,
                 codes_per_image: int) -> tuple[int, int]:
    """(P, limit): the padded prompt length and how many tokens the loop may generate.

    Raises ValueError naming the first prompt that does not fit.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    need = codes_per_image + 2 if modality == "image" else 1
    if modality == "image" and codes_per_image <= 0:
        raise ValueError("modality='image' needs an image tokenizer (codes_per_image is unknown)")
    if modality == "image" and max_new_tokens < need:
        raise ValueError(f"modality='image' needs max_new_tokens >= {need} (<boi>, {codes_per_image} codes, <eoi>), "
                         f"got {max_new_tokens}")
    for j, n in enumerate(prompt_lens):
        if n < 1:
            raise ValueError(f"prompt {j} is empty (it needs at least <bos>)")
        if n + need > context:
            what = "an image" if modality == "image" else "one new token"
            raise ValueError(f"prompt {j} has {n} tokens and does not fit the model's context of {context} tokens "
                             f"with room for {what} ({need} tokens); at most {context - need} prompt tokens fit")
    longest = max(prompt_lens)
    # Bucket the padded length, but never let padding eat context a long generation needs.
    padded = min(prompt_bucket(longest), max(longest, context - max_new_tokens))
    limit = min(max_new_tokens, context - padded)
    return padded, limit


def decode_spec(*, limit: int, codes_per_image: int, modality: str, form: str, text: SamplingParams,
                image: SamplingParams, return_logits: bool, image_decoding: str = "sequential",
                jacobi_window: int = 16, jacobi_init: str = "uniform") -> DecodeSpec:
    """The static part of a call. Only the settings of a modality the loop can sample count:
    greedy text under the (sampled) image defaults compiles a step with no random draws.
    Jacobi decoding applies only where images can be drawn (else the loop is the sequential one)."""
    used = [p for p, ok in ((text, modality != "image"), (image, modality != "text" and codes_per_image > 0)) if ok]
    draws_images = modality != "text" and codes_per_image > 0
    window = jacobi.window_size(jacobi_window, codes_per_image) if image_decoding == "jacobi" and draws_images else 0
    return DecodeSpec(
        limit=limit, codes_per_image=int(codes_per_image), modality=modality, form=form,
        use_top_k=any(p.uses_top_k for p in used), use_top_p=any(p.uses_top_p for p in used),
        use_sampling=any(p.temperature > 0 for p in used), return_logits=return_logits,
        jacobi_window=window, jacobi_init=jacobi_init,
    )


def pad_prompts(rows: Sequence[Sequence[int]], padded_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads rows to padded_len: (int32 tokens [R, P], bool mask [R, P])."""
    tokens = np.full([len(rows), padded_len], pad_id, np.int32)
    mask = np.zeros([len(rows), padded_len], bool)
    for r, row in enumerate(rows):
        if len(row):
            tokens[r, padded_len - len(row):] = row
            mask[r, padded_len - len(row):] = True
    return tokens, mask


def _choose(logits_rv, row_state, step, key, params, tables, spec, batch):
    """Guidance, modes and sampling for one step. Returns (tokens [B], new state, pre-mask logits [B, V])."""
    cond_bv = guidance_lib.conditional_rows(logits_rv, guidance_lib.FORMS.index(spec.form) + 1)
    is_image_b = row_state.mode_b == modes.IMAGE
    if spec.form != "none":
        guided_bv = guidance_lib.combine(logits_rv, params.guidance_scales, form=spec.form)
        logits_bv = jnp.where(is_image_b[:, None], guided_bv, cond_bv)
    else:
        logits_bv = cond_bv
    mode_kw = dict(codes_per_image=spec.codes_per_image, modality=spec.modality)
    allowed_bv = modes.allowed_tokens(row_state, tables, step, limit=spec.limit, **mode_kw)
    temperature_b = jnp.where(is_image_b, params.image_temperature, params.text_temperature)
    top_k_b = jnp.where(is_image_b, params.image_top_k, params.text_top_k)
    top_p_b = jnp.where(is_image_b, params.image_top_p, params.text_top_p)
    filtered_bv = sampling.filter_logits(
        sampling.mask_logits(logits_bv, allowed_bv), temperature_b, top_k_b, top_p_b,
        use_top_k=spec.use_top_k, use_top_p=spec.use_top_p,
    )
    if spec.use_sampling:
        row_ids_b = jnp.arange(batch, dtype=jnp.int32) if params.row_ids_b is None else params.row_ids_b
        token_b = sampling.choose_tokens(jax.random.fold_in(key, step), row_ids_b, filtered_bv, temperature_b)
    else:
        token_b = sampling.first_argmax(filtered_bv)
    forced_b = modes.forced_tokens(row_state, tables, step, modality=spec.modality)
    token_b = jnp.where(forced_b >= 0, forced_b, token_b)
    new_state = modes.advance(row_state, token_b, tables, step, limit=spec.limit, **mode_kw)
    return token_b, new_state, logits_bv


class _Carry(NamedTuple):
    step: jax.Array
    token_b: jax.Array
    cache: object
    row_state: modes.RowState
    first_r: jax.Array
    length_b: jax.Array
    out_bn: jax.Array
    logits_bnv: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def _decode_loop(graphdef, model_state, tables, tokens_rp, mask_rp, params, key, *, spec):
    model = nnx.merge(graphdef, model_state)
    # Models with learned image positions are told each fed token's index in its image.
    positioned = getattr(model.cfg, "image_positions", 0) > 0

    def run_model(tokens_rt, positions_rt, cache, write, kv_mask_rs, index_rt=None):
        # Fresh Variable objects at each trace level (tree.map rebuilds them): nnx transforms
        # inside the model (nnx.scan over stacked layers) refuse variables created outside
        # the while loop's trace.
        model = nnx.merge(graphdef, jax.tree.map(lambda x: x, model_state), copy=True)
        index = () if index_rt is None else (index_rt,)
        return model.decode(tokens_rt, positions_rt, cache, write, kv_mask_rs, *index)

    rows, padded = tokens_rp.shape
    streams = guidance_lib.FORMS.index(spec.form) + 1
    batch = rows // streams
    limit = spec.limit
    cache_len = padded + limit + jacobi.overhang_slots(spec)
    slots_s = jnp.arange(cache_len, dtype=jnp.int32)

    base_mask_rs = jnp.pad(mask_rp, ((0, 0), (0, cache_len - padded)))
    base_len_r = mask_rp.sum(axis=1).astype(jnp.int32)
    positions_rp = jnp.maximum(jnp.cumsum(mask_rp, axis=1, dtype=jnp.int32) - 1, 0)
    cache = model.init_cache(rows, cache_len)
    head_index = last_index = None
    if positioned:
        index_rp = image_index(tokens_rp, boi_id=tables.boi_id, eoi_id=tables.eoi_id)
        head_index, last_index = index_rp[:, :-1], index_rp[:, -1:]
    # Prefill in two calls: the logits of all but the last prompt position are dead code that
    # XLA removes, so the output projection runs on one position per row, not P.
    if padded > 1:
        _, cache = run_model(tokens_rp[:, :-1], positions_rp[:, :-1], cache, jnp.int32(0), base_mask_rs,
                             head_index)
    logits_r1v, cache = run_model(tokens_rp[:, -1:], positions_rp[:, -1:], cache, jnp.int32(padded - 1),
                                  base_mask_rs, last_index)

    row_state = modes.init_state(batch)
    token_b, row_state, logits_bv = _choose(logits_r1v[:, 0], row_state, jnp.int32(0), key, params, tables,
                                            spec, batch)
    out_bn = jnp.full([batch, limit], tables.pad_id, jnp.int32).at[:, 0].set(token_b)
    vocab = logits_bv.shape[-1]
    logits_bnv = jnp.zeros([batch, limit if spec.return_logits else 0, vocab], jnp.float32)
    if spec.return_logits:
        logits_bnv = logits_bnv.at[:, 0].set(logits_bv)
    is_guide_r = guidance_lib.guidance_row_mask(rows, streams)
    first_r = jnp.where(is_guide_r, cache_len, padded).astype(jnp.int32)
    if spec.jacobi_window:
        return jacobi.decode_loop(run_model, _choose, cache, token_b, row_state, first_r, logits_bv, tables=tables,
                                  params=params, key=key, spec=spec, base_mask_rs=base_mask_rs, base_len_r=base_len_r,
                                  batch=batch, streams=streams, padded=padded, positioned=positioned)

    def keep_going(c: _Carry):
        return (c.step < limit) & ~jnp.all(c.row_state.done_b)

    def step_fn(c: _Carry) -> _Carry:
        write = padded + c.step - 1  # the slot of the token being fed
        token_r = guidance_lib.to_rows(c.token_b, streams)
        # A guidance row that is fed <boi> forgets everything generated before it.
        first_r = jnp.where(is_guide_r & (token_r == tables.boi_id), write, c.first_r)
        visible_rs = base_mask_rs | ((slots_s[None] >= first_r[:, None]) & (slots_s[None] <= write))
        pos_r = jnp.maximum(base_len_r + write - first_r, 0)
        index_r1 = None
        if positioned:  # guidance rows feed the same token at the same index as their own row
            index_b = modes.code_index(c.row_state, c.token_b, tables, codes_per_image=spec.codes_per_image)
            index_r1 = guidance_lib.to_rows(index_b, streams)[:, None]
        logits_r1v, cache = run_model(token_r[:, None], pos_r[:, None], c.cache, write, visible_rs, index_r1)
        token_b, row_state, logits_bv = _choose(logits_r1v[:, 0], c.row_state, c.step, key, params, tables,
                                                spec, batch)
        logits_bnv = c.logits_bnv
        if spec.return_logits:
            logits_bnv = jax.lax.dynamic_update_index_in_dim(logits_bnv, logits_bv, c.step, axis=1)
        return _Carry(
            c.step + 1, token_b, cache, row_state, first_r,
            c.length_b + (~c.row_state.done_b).astype(jnp.int32),
            jax.lax.dynamic_update_index_in_dim(c.out_bn, token_b, c.step, axis=1),
            logits_bnv,
        )

    carry = _Carry(jnp.int32(1), token_b, cache, row_state, first_r, jnp.ones([batch], jnp.int32), out_bn, logits_bnv)
    carry = jax.lax.while_loop(keep_going, step_fn, carry)
    return carry.out_bn, carry.length_b, carry.step, carry.logits_bnv


def generate_tokens(
    model,
    vocab,
    prompts: Sequence[Sequence[int]],
    *,
    modality: str = "text",
    max_new_tokens: int = 64,
    text: SamplingParams = SamplingParams(temperature=0.0),
    image: SamplingParams = SamplingParams(),
    guidance: Guidance = Guidance(),
    codes_per_image: int = 0,
    seed: int = 0,
    stop_at_eot: bool = True,
    ignore_eos: bool = False,
    return_logits: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
    stream_ids: Sequence[int] | None = None,
    image_decoding: str = "sequential",
    jacobi_window: int = 16,
    jacobi_init: str = "uniform",
) -> DecodeResult:
    """Generates continuations of token-id prompts with one compiled loop.

    model: has `init_cache(batch, max_len)` and `decode(tokens_bt, positions_bt,
    cache, write_index, kv_mask_bs) -> (logits_btv, cache)`, and a config with
    `vocab_size` and `max_seq_len`; or a `FrozenModel` of one (`freeze(model)`). vocab: a Vocabulary (ids and masks).
    prompts: B lists of ids, each starting with `<bos>`, of any lengths.
    codes_per_image: the image tokenizer's code count (0: images are never
    opened). Same seed, same prompts, same settings -> same tokens.
    mesh, rules: run on a device mesh with the training rules table (default
    `MeshConfig().rules`); the model's parameters must already be placed on it
    (`sharding.place_model`). See `placement.py` for the layout and for several
    processes, where each passes its own prompts and gets their outputs back.
    The tokens are the ones one device would choose.
    stream_ids: each prompt's random stream under `seed` (default: its index in the
    batch, counted over all processes); a prompt's samples depend on its own id only.
    image_decoding: "sequential" (one code per forward pass) or "jacobi"
    (speculative Jacobi decoding, jacobi.py: up to jacobi_window codes verified
    per pass, fresh drafts by jacobi_init; the same distribution, and with image
    temperature 0 the same tokens; a seed draws other samples than sequential).
    """
    if modality not in modes.MODALITIES:
        raise ValueError(f"modality must be one of {modes.MODALITIES}, got {modality!r}")
    if image_decoding not in jacobi.DECODINGS:
        raise ValueError(f"image_decoding must be one of {jacobi.DECODINGS}, got {image_decoding!r}")
    if jacobi_window < 1:
        raise ValueError(f"jacobi_window must be >= 1, got {jacobi_window}")
    if jacobi_init not in jacobi.INITS:
        raise ValueError(f"jacobi_init must be one of {jacobi.INITS}, got {jacobi_init!r}")
    if not prompts and mesh is None:  # on a mesh, a process may have no prompts of its own
        raise ValueError("no prompts given")
    if stream_ids is not None and len(stream_ids) != len(prompts):
        raise ValueError(f"{len(stream_ids)} stream_ids for {len(prompts)} prompts")
    if modality == "text" or codes_per_image <= 0:
        guidance = Guidance()  # guidance only touches image tokens
    lengths, batch = [len(p) for p in prompts], None
    if mesh is not None:
        placement = placement_lib.Placement.of(mesh, rules)
        batch = placement_lib.local_batch(prompts, placement, vocab.bos_id, stream_ids)
        prompts, lengths = batch.prompts, batch.all_lengths  # every process plans the same shapes
    rows = guidance_lib.stream_prompts(prompts, guidance, bos_id=vocab.bos_id, boi_id=vocab.boi_id,
                                       eoi_id=vocab.eoi_id)
    padded, limit = plan_lengths(
        lengths, max_new_tokens=max_new_tokens, context=model_context(model),
        modality=modality, codes_per_image=codes_per_image,
    )
    tokens_rp, mask_rp = pad_prompts(rows, padded, vocab.pad_id)
    spec = decode_spec(limit=limit, codes_per_image=codes_per_image, modality=modality, form=guidance.form,
                       text=text, image=image, return_logits=return_logits, image_decoding=image_decoding,
                       jacobi_window=jacobi_window, jacobi_init=jacobi_init)
    f32, i32 = (lambda x: jnp.asarray(x, jnp.float32)), (lambda x: jnp.asarray(x, jnp.int32))
    params = DecodeParams(
        f32(text.temperature), i32(text.top_k), f32(text.top_p),
        f32(image.temperature), i32(image.top_k), f32(image.top_p), guidance.scales(),
        None if stream_ids is None else jnp.asarray(stream_ids, jnp.int32),
    )
    tables = modes.token_tables(vocab, model_vocab_size(model), stop_at_eot=stop_at_eot, ignore_eos=ignore_eos)
    graphdef, model_state, _ = model if isinstance(model, FrozenModel) else freeze(model)
    if batch is not None:
        out_bn, length_b, steps, logits_bnv = placement_lib.run_loop(
            _decode_loop.__wrapped__, graphdef, model_state, tables, tokens_rp, mask_rp, params, seed, spec=spec,
            placement=placement, batch=batch, streams=guidance.num_streams,
        )
    else:
        out_bn, length_b, steps, logits_bnv = _decode_loop(
            graphdef, model_state, tables, jnp.asarray(tokens_rp), jnp.asarray(mask_rp), params,
            jax.random.key(seed), spec=spec,
        )
    out_bn, length_b = np.asarray(out_bn), np.asarray(length_b)
    return DecodeResult(
        tokens=[out_bn[b, : length_b[b]].tolist() for b in range(len(out_bn))],
        steps=int(steps), prompt_len=padded, cache_len=padded + limit + jacobi.overhang_slots(spec),
        logits=np.asarray(logits_bnv) if return_logits else None,
    )

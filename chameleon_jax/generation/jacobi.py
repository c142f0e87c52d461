"""Speculative Jacobi decoding of image codes (Teng et al., ICLR 2025) inside the compiled loop.

While a row draws an image, each loop step feeds it its last token plus a window
of L draft codes in one forward pass and verifies the drafts left to right
against the distributions that pass gives, after guidance, the image mask,
temperature, top-k and top-p (the distributions sequential decoding samples):

  draft x_i, drawn from q_i, is kept when u < p_i(x_i) / q_i(x_i), u ~ U[0, 1);
  at the first rejection a code is drawn from normalise(max(p_i - q_i, 0));
  when every draft is kept, one more code is drawn from the next p.

The image then has exactly the distribution of sequential sampling. The kept
drafts and the drawn code are committed; the codes the pass sampled at the
positions after them become the next step's drafts (their q is the p they were
drawn from), and the rest of the window is refilled with new drafts: uniform
over the image codes, or the code to their left (`INITS`). With temperature 0,
p is one-hot and this is plain Jacobi iteration: the output is sequential
greedy decoding's, token for token; such a step draws no random numbers (fresh
drafts are spread over the codes by a hash). Samples are drawn by the inverse CDF
(`sample`), one uniform a draw.

Rows not drawing (text, a forced `<eoi>`, finished) take one token per step
through the sequential loop's own choice (`decode._choose`, run per row), so
every row advances by its own count. A step in which no row draws feeds one
token per row instead of the window.

Cache: S = P + limit + W slots per row, W = L + 1 (a window may reach past the
last token the loop keeps). Each pass writes every row at its own slots (a per-row
write index): generated token t sits in slot P + t, as in the sequential loop.
Slots past a row's committed tokens hold rejected drafts; the mask hides them and
the row's later passes overwrite them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from chameleon_jax.generation import guidance as guidance_lib
from chameleon_jax.generation import modes
from chameleon_jax.generation import sampling

DECODINGS = ("sequential", "jacobi")
INITS = ("uniform", "left")  # fresh drafts: uniform over the image codes, or the code to their left


def window_size(jacobi_window: int, codes_per_image: int) -> int:
    """Drafts verified per forward pass: the window asked for, never more than one image holds."""
    return max(0, min(int(jacobi_window), int(codes_per_image)))


def overhang_slots(spec) -> int:
    """Cache slots the loop needs past P + limit, where a last window may write: the window and
    the token before it (0 when sequential)."""
    return spec.jacobi_window + 1 if spec.jacobi_window > 0 else 0


def accept_drafts(u_bl: jax.Array, p_x_bl: jax.Array, q_x_bl: jax.Array) -> jax.Array:
    """bool [B, L]: speculative sampling's test u < p(x) / q(x), without the division (q(x) > 0 for a
    drawn x). With a one-hot p (greedy) it keeps a draft exactly when it is the argmax."""
    return u_bl * q_x_bl < p_x_bl


def residual(p_bv: jax.Array, q_bv: jax.Array) -> jax.Array:
    """max(p - q, 0), unnormalised: what a rejected position draws from [B, V].

    A rejection means p(x) < q(x) for the draft, so p > q somewhere else; where
    rounding leaves nothing positive, p itself.
    """
    r_bv = jnp.maximum(p_bv - q_bv, 0.0)
    return jnp.where(jnp.sum(r_bv, axis=-1, keepdims=True) > 0, r_bv, p_bv)


def sample(weights_nv: jax.Array, u_n: jax.Array) -> jax.Array:
    """int32 [...]: a draw from weights (>= 0, any total) by the inverse CDF: the first id whose
    running sum passes u times the total, u ~ U[0, 1). One uniform a draw instead of a Gumbel
    per id (25x cheaper on a CPU for 17 draws over 896 ids). Ids of weight 0 are never drawn;
    with one-hot weights (greedy) every u gives their id."""
    cdf_nv = jnp.cumsum(weights_nv, axis=-1)
    passed_nv = cdf_nv > u_n[..., None] * cdf_nv[..., -1:]
    # A u that rounds to the total passes nowhere: the heaviest id stands in.
    return jnp.where(jnp.any(passed_nv, axis=-1), jnp.argmax(passed_nv, axis=-1),
                     sampling.first_argmax(weights_nv)).astype(jnp.int32)


def image_distributions(logits_bwv: jax.Array, tables: modes.TokenTables, params, spec) -> jax.Array:
    """p, float32 [B, W, V]: the distribution of the next code at every window position.

    Image mode's processing: only image codes, then the image temperature, top-k
    and top-p; p is their softmax, or one-hot at the argmax when the image
    temperature is 0.
    """
    b, w, v = logits_bwv.shape
    n = b * w
    flat_nv = sampling.mask_logits(logits_bwv.reshape(n, v), tables.image_v[None])
    full = lambda x: jnp.broadcast_to(x, (n,))
    filtered_nv = sampling.filter_logits(
        flat_nv, full(params.image_temperature), full(params.image_top_k), full(params.image_top_p),
        use_top_k=spec.use_top_k, use_top_p=spec.use_top_p,
    )
    p_nv = jnp.where(params.image_temperature <= 0, jax.nn.one_hot(sampling.first_argmax(filtered_nv), v),
                     jax.nn.softmax(filtered_nv, axis=-1))
    return p_nv.reshape(b, w, v)


def image_ids_first(tables: modes.TokenTables) -> jax.Array:
    """int32 [V]: the image-code ids in increasing order, then the other ids; entry k < number of
    codes is the k-th image code. Computed once per loop, so a uniform draft is one gather."""
    return jnp.argsort(~tables.image_v, stable=True).astype(jnp.int32)


def refill_drafts(drafts_bl, q_blv, carried_b, last_b, u_bl, tables: modes.TokenTables, init: str,
                  ids_v: jax.Array):
    """Drafts int32 [B, L] and the distributions they come from float32 [B, L, V], with the
    positions from carried_b on drawn afresh.

    "uniform": each fresh draft uniform over the image codes. "left": each fresh
    draft is the code to its left (the last carried draft, else the row's last
    token), so q is one-hot; the first code of an image has none and is uniform.
    u_bl: float32 [B, L] uniform on [0, 1), the randomness of the uniform drafts.
    ids_v: `image_ids_first(tables)`.
    """
    b, l = drafts_bl.shape
    v = q_blv.shape[-1]
    image_v = tables.image_v
    num_codes = jnp.sum(image_v.astype(jnp.int32))
    uniform_v = image_v.astype(jnp.float32) / num_codes
    k_bl = jnp.minimum((u_bl * num_codes).astype(jnp.int32), num_codes - 1)
    uniform_bl = ids_v[k_bl]
    fresh_bl = jnp.arange(l)[None] >= carried_b[:, None]
    if init == "uniform":
        new_bl, new_q_blv = uniform_bl, jnp.broadcast_to(uniform_v, (b, l, v))
    else:
        carried_last_b = jnp.take_along_axis(drafts_bl, jnp.maximum(carried_b - 1, 0)[:, None], axis=1)[:, 0]
        left_b = jnp.where(carried_b > 0, carried_last_b, last_b)
        has_left_b = image_v[left_b]
        base_b = jnp.where(has_left_b, left_b, uniform_bl[:, 0])
        new_bl = jnp.broadcast_to(base_b[:, None], (b, l))
        starts_uniform_bl = (jnp.arange(l)[None] == carried_b[:, None]) & ~has_left_b[:, None]
        new_q_blv = jnp.where(starts_uniform_bl[..., None], uniform_v, jax.nn.one_hot(base_b, v)[:, None])
    return jnp.where(fresh_bl, new_bl, drafts_bl), jnp.where(fresh_bl[..., None], new_q_blv, q_blv)


def drawing(state: modes.RowState) -> jax.Array:
    """bool [B]: rows that still owe codes of an open image (the ones a window step verifies)."""
    return (state.mode_b == modes.IMAGE) & (state.codes_left_b > 0) & ~state.done_b


def _put_rows(buffer_bm, values_bw, at_b):
    """buffer with row b's values written at [at_b[b], at_b[b] + W) along axis 1."""
    return jax.vmap(lambda row, vals, at: jax.lax.dynamic_update_slice_in_dim(row, vals, at, axis=0))(
        buffer_bm, values_bw, at_b)


class _Carry(NamedTuple):
    it: jax.Array  # loop iterations so far, the prefill counted as one
    n_b: jax.Array  # int32 [B]: tokens each row has generated (the index of its next one)
    token_b: jax.Array  # int32 [B]: each row's last token, fed next (not yet in the cache)
    cache: object
    row_state: modes.RowState
    first_r: jax.Array  # int32 [R]: first generated slot each row sees (see decode.py)
    out_bm: jax.Array  # int32 [B, limit + W]
    logits_bmv: jax.Array  # float32 [B, limit + W, V] (V = 0 unless logits are returned)
    drafts_bl: jax.Array  # int32 [B, L]: drafts of the codes after token_b
    q_blv: jax.Array  # float32 [B, L, V]: the distribution each draft was drawn from
    carried_b: jax.Array  # int32 [B]: how many leading drafts are carried over (the rest are refilled)


def decode_loop(run_model: Callable, choose: Callable, cache, token_b, row_state, first_r, logits_bv, *, tables,
                params, key, spec, base_mask_rs, base_len_r, batch: int, streams: int, padded: int,
                positioned: bool):
    """The loop after the prefill, with Jacobi steps while any row draws an image.

    run_model(tokens_rt, positions_rt, cache, write, kv_mask_rs, index_rt) -> (logits_rtv, cache);
    choose: `decode._choose`. The rest is the sequential loop's state after the prefill.
    Returns what `decode._decode_loop` returns: (out_bn, length_b, steps, logits_bnv).
    """
    limit, codes = spec.limit, spec.codes_per_image
    window = spec.jacobi_window
    width = window + 1
    rows = batch * streams
    slots_s = jnp.arange(base_mask_rs.shape[1], dtype=jnp.int32)
    is_guide_r = guidance_lib.guidance_row_mask(rows, streams)
    vocab = logits_bv.shape[-1]
    choose_key, jacobi_key = jax.random.split(key)
    # Each prompt's random stream id, as the sequential loop uses it: its draws do not depend on the batch.
    row_ids_b = jnp.arange(batch, dtype=jnp.int32) if params.row_ids_b is None else params.row_ids_b
    advance_kw = dict(limit=limit, codes_per_image=codes, modality=spec.modality)
    j_w = jnp.arange(width)
    ids_v = image_ids_first(tables)

    def choose_rows(state, n_b, logits_rv):
        """Each row's one token as the sequential loop picks it (own step and stream id): int32 [B], logits [B, V]."""

        def one(logits_sv, row, n, row_id):
            token_1, _, chosen_1v = choose(logits_sv, jax.tree.map(lambda a: a[None], row), n, choose_key,
                                           params._replace(row_ids_b=row_id[None]), tables, spec, 1)
            return token_1[0], chosen_1v[0]

        return jax.vmap(one)(guidance_lib.prompt_streams(logits_rv, streams), state, n_b, row_ids_b)

    def feed(c, tokens_rt, index_rt):
        """Runs T tokens per row, written to each row's next slots."""
        t = tokens_rt.shape[1]
        at_r = guidance_lib.to_rows(padded + c.n_b - 1, streams)  # the slot the first fed token belongs in
        # A guidance row that is fed <boi> forgets everything generated before it.
        first_r = jnp.where(is_guide_r & (tokens_rt[:, 0] == tables.boi_id), at_r, c.first_r)
        visible_rs = base_mask_rs | ((slots_s >= first_r[:, None]) & (slots_s < at_r[:, None] + t))
        positions_rt = jnp.maximum(base_len_r + at_r - first_r, 0)[:, None] + jnp.arange(t, dtype=jnp.int32)
        logits_rtv, cache = run_model(tokens_rt, positions_rt, c.cache, at_r, visible_rs, index_rt)
        return logits_rtv, cache, first_r

    def commit(c, cache, first_r, tokens_bw, count_b, chosen_bwv, drafts_bl, q_blv, carried_b):
        """Appends each row's first count_b tokens and moves its state past them."""
        kept_bw = j_w[None] < count_b[:, None]
        tokens_bw = jnp.where(kept_bw, tokens_bw, tables.pad_id)

        def advance_one(j, state):
            moved = modes.advance(state, tokens_bw[:, j], tables, c.n_b + j, **advance_kw)
            return jax.tree.map(lambda new, old: jnp.where(kept_bw[:, j], new, old), moved, state)

        state = jax.lax.fori_loop(0, width, advance_one, c.row_state)
        last_b = jnp.take_along_axis(tokens_bw, jnp.maximum(count_b - 1, 0)[:, None], axis=1)[:, 0]
        logits_bmv = _put_rows(c.logits_bmv, chosen_bwv, c.n_b) if spec.return_logits else c.logits_bmv
        return _Carry(
            c.it + 1, c.n_b + count_b, jnp.where(count_b > 0, last_b, tables.pad_id), cache, state, first_r,
            _put_rows(c.out_bm, tokens_bw, c.n_b), logits_bmv, drafts_bl, q_blv,
            jnp.where(drawing(state), carried_b, 0),
        )

    def pad_window(x_b):
        return jnp.concatenate([x_b[:, None], jnp.full((batch, width - 1), tables.pad_id, jnp.int32)], axis=1)

    def chosen_logits(logits_bv):
        return jnp.zeros((batch, width, vocab), jnp.float32).at[:, 0].set(logits_bv)

    def single_step(c: _Carry) -> _Carry:
        index_r1 = None
        if positioned:  # guidance rows feed the same token at the same index as their own row
            index_b = modes.code_index(c.row_state, c.token_b, tables, codes_per_image=codes)
            index_r1 = guidance_lib.to_rows(index_b, streams)[:, None]
        logits_r1v, cache, first_r = feed(c, guidance_lib.to_rows(c.token_b, streams)[:, None], index_r1)
        token_b, logits_bv = choose_rows(c.row_state, c.n_b, logits_r1v[:, 0])
        chosen = chosen_logits(logits_bv) if spec.return_logits else None
        return commit(c, cache, first_r, pad_window(token_b), (~c.row_state.done_b).astype(jnp.int32), chosen,
                      c.drafts_bl, c.q_blv, jnp.zeros_like(c.carried_b))

    def window_step(c: _Carry) -> _Carry:
        state = c.row_state
        # All of the step's randomness in one draw (each random op is costly to compile), from each
        # row's own key (its stream id), so a row's draws do not depend on the other rows: a uniform
        # per window sample, one for the residual, one per draft test and one per fresh draft.
        if spec.use_sampling:
            keys_b = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.fold_in(jacobi_key, c.it), row_ids_b)
            u_bx = jax.vmap(lambda k: jax.random.uniform(k, (width + 1 + 2 * window,)))(keys_b)
            u_bw, u_residual_b, u_bl, u_fill_bl = jnp.split(u_bx, [width, width + 1, width + 1 + window], axis=1)
            u_residual_b = u_residual_b[:, 0]
        else:  # greedy: p is one-hot, so every u draws its argmax and keeps a draft iff it is that
            # argmax; no random numbers are drawn. Fresh drafts only need to be spread over the codes,
            # which a multiplicative hash of (row, step, position) does.
            u_bw, u_residual_b, u_bl = jnp.zeros((batch, width)), jnp.zeros((batch,)), jnp.zeros((batch, window))
            n_bl = (c.it * window + jnp.arange(window))[None] + 7919 * row_ids_b[:, None]
            u_fill_bl = ((n_bl.astype(jnp.uint32) * jnp.uint32(2654435761)) >> 8).astype(jnp.float32) * 2.0 ** -24
        drafts_bl, q_blv = refill_drafts(c.drafts_bl, c.q_blv, c.carried_b, c.token_b, u_fill_bl, tables,
                                         spec.jacobi_init, ids_v)
        drawing_b = drawing(state)
        fed_bw = jnp.concatenate([c.token_b[:, None], jnp.where(drawing_b[:, None], drafts_bl, tables.pad_id)], 1)
        index_rw = None
        if positioned:  # the last token's index, then the drafts' (the first draft is code codes - codes_left)
            index_b = modes.code_index(state, c.token_b, tables, codes_per_image=codes)
            draft_index_bw = (codes - state.codes_left_b)[:, None] + j_w[None] - 1
            index_bw = jnp.where(j_w[None] == 0, index_b[:, None], jnp.where(drawing_b[:, None], draft_index_bw, -1))
            index_rw = guidance_lib.to_rows(index_bw, streams)
        logits_rwv, cache, first_r = feed(c, guidance_lib.to_rows(fed_bw, streams), index_rw)

        # Rows not drawing: one token, as in a sequential step.
        one_b, one_logits_bv = choose_rows(state, c.n_b, logits_rwv[:, 0])

        # Rows drawing: p at every position, then the left-to-right test of the drafts.
        guided_bwv = jax.vmap(lambda l_rv: guidance_lib.combine(l_rv, params.guidance_scales, form=spec.form),
                              in_axes=1, out_axes=1)(logits_rwv)
        p_bwv = image_distributions(guided_bwv, tables, params, spec)
        samples_bw = sample(p_bwv, u_bw)
        p_x_bl = jnp.take_along_axis(p_bwv[:, :window], drafts_bl[..., None], axis=-1)[..., 0]
        q_x_bl = jnp.take_along_axis(q_blv, drafts_bl[..., None], axis=-1)[..., 0]
        verifiable_b = jnp.minimum(state.codes_left_b, window)  # drafts past the image's last code are not codes
        ok_bl = accept_drafts(u_bl, p_x_bl, q_x_bl) & (jnp.arange(window)[None] < verifiable_b[:, None])
        kept_b = jnp.sum(jnp.cumprod(ok_bl.astype(jnp.int32), axis=1), axis=1)

        # The token after the kept drafts: a draw from the residual at a rejection, else the
        # next code sampled from p, or <eoi> once the image is complete.
        at = lambda x, i_b: jnp.take_along_axis(x, i_b.reshape((batch,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
        resampled_b = sample(residual(at(p_bwv, kept_b), at(q_blv, jnp.minimum(kept_b, window - 1))), u_residual_b)
        next_b = jnp.where(kept_b < verifiable_b, resampled_b,
                           jnp.where(kept_b >= state.codes_left_b, tables.eoi_id, at(samples_bw, kept_b)))
        drafts_bw = jnp.concatenate([drafts_bl, jnp.full((batch, 1), tables.pad_id, jnp.int32)], axis=1)
        drawn_bw = jnp.where(j_w[None] < kept_b[:, None], drafts_bw, next_b[:, None])
        tokens_bw = jnp.where(drawing_b[:, None], drawn_bw, pad_window(one_b))
        count_b = jnp.where(drawing_b, kept_b + 1, (~state.done_b).astype(jnp.int32))
        chosen = None
        if spec.return_logits:
            chosen = jnp.where(drawing_b[:, None, None], guided_bwv, chosen_logits(one_logits_bv))

        # Next drafts: the codes sampled after the committed ones, with the p they came from.
        src_bl = jnp.minimum(kept_b[:, None] + 1 + jnp.arange(window)[None], window)
        next_drafts_bl = jnp.take_along_axis(samples_bw, src_bl, axis=1)
        next_q_blv = jnp.take_along_axis(p_bwv, src_bl[..., None], axis=1)
        carried_b = jnp.where(drawing_b, window - kept_b, 0)
        return commit(c, cache, first_r, tokens_bw, count_b, chosen, next_drafts_bl, next_q_blv, carried_b)

    def keep_going(c: _Carry):
        return (c.it < limit) & ~jnp.all(c.row_state.done_b)

    def any_drawing(c: _Carry):
        return jnp.any(drawing(c.row_state))

    def phases(c: _Carry) -> _Carry:
        """Single steps while no row draws, then window steps while any row does.

        Two inner loops rather than a `lax.cond` per step: a conditional's result is a new
        buffer, so XLA would copy the whole KV cache into and out of it on every step,
        while a loop updates its carry in place."""
        c = jax.lax.while_loop(lambda c: keep_going(c) & ~any_drawing(c), single_step, c)
        return jax.lax.while_loop(lambda c: keep_going(c) & any_drawing(c), window_step, c)

    out_bm = jnp.full((batch, limit + width), tables.pad_id, jnp.int32).at[:, 0].set(token_b)
    logits_bmv = jnp.zeros((batch, limit + width, vocab if spec.return_logits else 0), jnp.float32)
    if spec.return_logits:
        logits_bmv = logits_bmv.at[:, 0].set(logits_bv)
    carry = _Carry(
        jnp.int32(1), jnp.ones((batch,), jnp.int32), token_b, cache, row_state, first_r, out_bm, logits_bmv,
        jnp.zeros((batch, window), jnp.int32), jnp.zeros((batch, window, vocab), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
    )
    carry = jax.lax.while_loop(keep_going, phases, carry)
    return carry.out_bm[:, :limit], carry.n_b, carry.it, carry.logits_bmv[:, :limit]

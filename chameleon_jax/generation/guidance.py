"""Classifier-free guidance for image tokens, with the extra streams in the same batch.

A guided call runs 2 or 3 streams of rows through one decode loop. The rows of
one prompt sit together (row `streams * b + s` is prompt b's stream s):

  stream 0   f: the full prompt (the conditional stream, which samples)
  stream 1   u: unconditional, context `<bos>` + the current image so far
  stream 2   i: image-only (three-stream form), context `<bos>` + the
             prompt's images (text dropped) + the current image so far

Keeping a prompt's streams adjacent means that when the rows are split over the
data axes of a device mesh (whole prompts per device), the guidance rows live on
the device of their conditional row: combining the logits needs no communication,
and each process of a multi-process run feeds one contiguous block of rows.

Every stream is fed the tokens the conditional stream chose. The guidance
streams keep their prompt in the KV cache and see generated tokens only from
the current image's `<boi>` on: when a row opens an image, the decoder moves
that row's "first visible generated slot" to the `<boi>` slot and restarts its
positions after its prompt, so each image is guided by a fresh context without
re-prefilling (see decode.py). Text-mode logits come from the conditional
stream alone; image-mode logits are

  two-stream:    u + s * (f - u)
  three-stream:  u + s_img * (i - u) + s_txt * (f - i)      (Chameleon's form)

so scale 1 (or s_img = s_txt = 1) is the conditional distribution and 0 the
unconditional one.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

FORMS = ("none", "two", "three")


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Resolved guidance settings: `form` is static (it sets the batch layout), the scales are not."""

    form: str = "none"
    scale: float = 1.0  # two-stream s
    image_scale: float = 1.0  # three-stream s_img
    text_scale: float = 1.0  # three-stream s_txt

    @property
    def num_streams(self) -> int:
        return FORMS.index(self.form) + 1

    def scales(self) -> jax.Array:
        """float32 [3]: (s, s_img, s_txt), passed to the compiled loop as data."""
        return jnp.asarray([self.scale, self.image_scale, self.text_scale], jnp.float32)


def resolve_guidance(cfg_scale: float = 1.0, cfg_image_scale: float | None = None,
                     cfg_text_scale: float | None = None) -> Guidance:
    """Picks the form from the user's knobs.

    cfg_scale alone: two-stream guidance, off at 1. cfg_image_scale and/or
    cfg_text_scale: three-stream guidance (the one not given is 1); cfg_scale
    must then stay 1.
    """
    if cfg_image_scale is None and cfg_text_scale is None:
        return Guidance("none") if cfg_scale == 1.0 else Guidance("two", scale=float(cfg_scale))
    if cfg_scale != 1.0:
        raise ValueError("give either cfg_scale (two-stream guidance) or cfg_image_scale/cfg_text_scale "
                         "(three-stream guidance), not both")
    image_scale = 1.0 if cfg_image_scale is None else float(cfg_image_scale)
    text_scale = 1.0 if cfg_text_scale is None else float(cfg_text_scale)
    return Guidance("three", image_scale=image_scale, text_scale=text_scale)


def combine(logits_rv: jax.Array, scales: jax.Array, *, form: str) -> jax.Array:
    """Guided image logits for the B conditional rows from all R = streams * B rows.

    logits_rv: float32 [R, V] in the row layout above; scales: float32 [3].
    Returns float32 [B, V]. With form "none" this is the conditional logits.
    """
    if form == "none":
        return logits_rv
    by_stream = prompt_streams(logits_rv, FORMS.index(form) + 1)
    full, uncond = by_stream[:, 0], by_stream[:, 1]
    if form == "two":
        return uncond + scales[0] * (full - uncond)
    image_only = by_stream[:, 2]
    return uncond + scales[1] * (image_only - uncond) + scales[2] * (full - image_only)


def prompt_streams(x_r: jax.Array, streams: int) -> jax.Array:
    """An array over all R = streams * B rows as [B, streams, ...]: each prompt's rows together."""
    return x_r.reshape(-1, streams, *x_r.shape[1:])


def conditional_rows(x_r: jax.Array, streams: int) -> jax.Array:
    """The B conditional rows (stream 0) of an array over all R = streams * B rows."""
    return prompt_streams(x_r, streams)[:, 0]


def to_rows(x_b: jax.Array, streams: int) -> jax.Array:
    """Per-prompt values [B, ...] repeated for each of the prompt's streams: [R, ...]."""
    return jnp.repeat(x_b, streams, axis=0)


def guidance_row_mask(rows: int, streams: int) -> jax.Array:
    """bool [R]: True on the guidance rows (every stream but the conditional one)."""
    return jnp.arange(rows) % streams != 0


def image_only_prompt(prompt_ids: Sequence[int], *, bos_id: int, boi_id: int, eoi_id: int) -> list[int]:
    """`<bos>` followed by the prompt's complete images (`<boi>` ... `<eoi>`), its text dropped."""
    out = [bos_id]
    inside, current = False, []
    for tok in prompt_ids:
        if tok == boi_id:
            inside, current = True, [tok]
        elif inside:
            current.append(tok)
            if tok == eoi_id:
                out.extend(current)
                inside = False
    return out


def stream_prompts(prompts: Sequence[Sequence[int]], guidance: Guidance, *, bos_id: int, boi_id: int,
                   eoi_id: int) -> list[list[int]]:
    """All rows' prompts in the row layout: each prompt followed by its guidance streams' prompts."""
    rows = []
    for p in prompts:
        rows.append(list(p))
        if guidance.num_streams >= 2:
            rows.append([bos_id])
        if guidance.num_streams >= 3:
            rows.append(image_only_prompt(p, bos_id=bos_id, boi_id=boi_id, eoi_id=eoi_id))
    return rows

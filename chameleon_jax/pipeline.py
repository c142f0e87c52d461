"""The public generation API: a model, its vocabulary and its image tokenizer behind one object.

    import chameleon_jax
    pipe = chameleon_jax.load_pipeline("runs/demo/lm/model")
    [result] = pipe.generate([["A red circle. Draw it:"]], modality="image", cfg_scale=3.0)
    # result: a list of segments, each a str or a uint8 [H, W, 3] image

A prompt is a list of segments (a `str`, or an HxWx3 uint8 image) or a bare
`str`; `generate` takes a list of prompts of any lengths and returns one list
of segments per prompt. Images in prompts are resized to the tokenizer's size
and encoded; generated images are decoded in one batch. A pipeline whose
image tokenizer cannot decode (imported encoder-only) returns generated
images as `ImageCodes`; one without an image tokenizer (a Hugging Face import)
generates text only.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from chameleon_jax.generation import SamplingParams, freeze, generate_tokens, resolve_guidance
from chameleon_jax.generation.decode import DecodeResult

Segment = Union[str, np.ndarray]
DEFAULT_TEXT_TOKENS = 128


@dataclasses.dataclass(frozen=True)
class ImageCodes:
    """A generated image this pipeline cannot draw (its tokenizer has no decoder): the code grid."""

    codes: np.ndarray  # int32 [h, w]


class Pipeline:
    """Generation over a model, a `Vocabulary` and an image tokenizer (or None).

    model: a `Transformer` (anything with its `init_cache`/`decode` methods and
    `cfg`). tokenizer: has `encode(uint8 [B,H,W,3]) -> int [B,h,w]`,
    `decode(codes) -> uint8 images`, `codes_per_image`, and optionally
    `image_size`, `grid`, `can_decode`.

    mesh: a `jax.sharding.Mesh` or a `MeshConfig` (built over the available devices):
    generation then runs on that mesh with the training rules table (`rules`, default
    the `MeshConfig`'s): the model's parameters are placed in their training shards and
    the decode loop splits prompts and KV cache over the data axes (`generation/placement.py`).
    Under `jax.distributed`, each process passes its own prompts and gets their outputs.

    The model is split once, on the first generation, and reused (`generation.freeze`).
    The split shares the model's variables, so weights updated in place are used; after
    replacing variables or submodules, or updating a stacked (`scan_layers`) model, whose
    split is an unstacked copy, call `refresh()` (assigning a new `model` refreshes too).
    """

    def __init__(self, model, vocab, tokenizer=None, *, mesh=None, rules=None):
        self.mesh, self.rules = resolve_mesh(mesh, rules)
        self.model = model
        self.vocab = vocab
        self.tokenizer = tokenizer
        if tokenizer is not None and getattr(tokenizer, "codebook_size", vocab.codebook_size) != vocab.codebook_size:
            raise ValueError(f"the image tokenizer has {tokenizer.codebook_size} codes but the vocabulary "
                             f"{vocab.codebook_size}: they do not belong together")

    @property
    def model(self):
        return self._model

    @model.setter
    def model(self, model) -> None:
        if self.mesh is not None:
            from chameleon_jax.sharding import place_model
            from chameleon_jax.transformer import Transformer, unstack_layers

            # Unstacked before placing, as `freeze` would: only the decoding layout is kept on the mesh.
            model = place_model(unstack_layers(model) if isinstance(model, Transformer) else model, self.mesh,
                                self.rules)
        self._model, self._frozen = model, None

    def refresh(self) -> None:
        """Forgets the split of the model taken for generation (after its structure changed)."""
        self._frozen = None

    @classmethod
    def from_parts(cls, model, vocab, tokenizer=None, *, mesh=None, rules=None) -> "Pipeline":
        return cls(model, vocab, tokenizer, mesh=mesh, rules=rules)

    # ------------------------------------------------------------------ facts

    @property
    def codes_per_image(self) -> int:
        """Codes in one image; 0 when there is no image tokenizer (images are never generated)."""
        return int(self.tokenizer.codes_per_image) if self.tokenizer is not None else 0

    @property
    def can_decode_images(self) -> bool:
        return self.tokenizer is not None and bool(getattr(self.tokenizer, "can_decode", True))

    @property
    def context_length(self) -> int:
        return int(self.model.cfg.max_seq_len)

    def _grid(self) -> tuple[int, int]:
        grid = getattr(self.tokenizer, "grid", None)
        if grid is not None:
            return tuple(int(g) for g in grid)
        side = math.isqrt(self.codes_per_image)
        if side * side != self.codes_per_image:
            raise ValueError(f"cannot lay {self.codes_per_image} codes out as a square grid; the tokenizer has no grid")
        return side, side

    # ----------------------------------------------------------------- images

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs an image tokenizer, and this pipeline has none "
                             "(a model imported from Hugging Face has no VQ decoder; it generates text only)")

    def encode_images(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """uint8 images (a list of [H, W, 3], or [B, H, W, 3]) -> int32 codes [B, h, w].

        Images of another size are resized (bicubic) to the tokenizer's image size.
        """
        self._require_tokenizer("encoding images")
        size = getattr(self.tokenizer, "image_size", None)
        batch = [_as_rgb_u8(img, i) for i, img in enumerate(images)]
        if size is not None:
            batch = [_resize(img, int(size)) for img in batch]
        elif len({img.shape for img in batch}) > 1:
            raise ValueError("images of different sizes need a tokenizer with an image_size to resize to")
        return np.asarray(self.tokenizer.encode(np.stack(batch)), np.int32)

    def decode_images(self, codes: np.ndarray) -> np.ndarray:
        """int codes [B, h, w] or [B, h*w] -> uint8 images [B, H, W, 3]."""
        self._require_tokenizer("decoding images")
        if not self.can_decode_images:
            raise ValueError("this pipeline's image tokenizer has no decoder: it can encode images but not draw them")
        codes = np.asarray(codes, np.int32)
        if codes.ndim == 2:
            codes = codes.reshape(codes.shape[0], *self._grid())
        return np.asarray(self.tokenizer.decode(codes), np.uint8)

    # ---------------------------------------------------------------- prompts

    def encode_prompt(self, prompt: str | Sequence[Segment]) -> list[int]:
        """One prompt -> token ids: `<bos>`, then text ids and `<boi>` codes `<eoi>` per segment."""
        segments = [prompt] if isinstance(prompt, str) else list(prompt)
        images = [s for s in segments if not isinstance(s, str)]
        codes = iter(self.encode_images(images)) if images else iter(())
        ids = [self.vocab.bos_id]
        for seg in segments:
            if isinstance(seg, str):
                ids += self.vocab.encode_text(seg)
            else:
                ids += [self.vocab.boi_id, *self.vocab.image_ids(next(codes).reshape(-1)).tolist(), self.vocab.eoi_id]
        return ids

    def segments_of(self, tokens: Sequence[int]) -> list[Segment]:
        """Generated ids -> segments: text runs as str, images as uint8 arrays (see `generate`)."""
        return self._segments_of_all([tokens])[0]

    def segments_of_rows(self, rows: Sequence[Sequence[int]]) -> list[list[Any]]:
        """`segments_of` for many rows at once (their images decoded in one batch)."""
        return self._segments_of_all(rows)

    def _segments_of_all(self, rows: Sequence[Sequence[int]]) -> list[list[Any]]:
        vocab = self.vocab
        pieces: list[list[Any]] = []
        pending: list[np.ndarray] = []  # code grids to decode, in order
        for tokens in rows:
            out, text, image = [], [], None
            for tok in tokens:
                if image is not None:
                    if tok == vocab.eoi_id:
                        if len(image) == self.codes_per_image:
                            out.append(len(pending))
                            pending.append(np.asarray(vocab.codes_from_ids(np.asarray(image)), np.int32))
                        image = None
                    else:
                        image.append(tok)
                elif tok == vocab.boi_id:
                    out.append(vocab.decode_text(text))
                    text, image = [], []
                else:
                    text.append(tok)
            out.append(vocab.decode_text(text))
            pieces.append(out)
        drawn: Any = None
        if pending:
            grids = np.stack(pending).reshape(len(pending), *self._grid())
            drawn = self.decode_images(grids) if self.can_decode_images else [ImageCodes(g) for g in grids]
        return [[drawn[p] if isinstance(p, int) else p for p in out if not (isinstance(p, str) and not p)]
                for out in pieces]

    # ------------------------------------------------------------- generation

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        modality: str = "text",
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        image_temperature: float = 1.0,
        image_top_k: int = 0,
        image_top_p: float = 1.0,
        cfg_scale: float = 1.0,
        cfg_image_scale: float | None = None,
        cfg_text_scale: float | None = None,
        seed: int = 0,
        stop_at_eot: bool = True,
        ignore_eos: bool = False,
        return_logits: bool = False,
        stream_ids: Sequence[int] | None = None,
        image_decoding: str = "sequential",
        jacobi_window: int = 16,
        jacobi_init: str = "uniform",
    ) -> DecodeResult:
        """Token-level `generate`: prompts of ids (each starting with `<bos>`) -> a `DecodeResult`.

        stream_ids: each prompt's random stream under `seed` (default: its index in the batch).
        """
        if modality == "image" and self.codes_per_image == 0:
            self._require_tokenizer("modality='image'")
        if max_new_tokens is None:
            max_new_tokens = default_max_new_tokens(modality, self.codes_per_image)
        if self._frozen is None:
            self._frozen = freeze(self.model)
        return generate_tokens(
            self._frozen, self.vocab, prompts, modality=modality, max_new_tokens=max_new_tokens,
            text=SamplingParams(temperature, top_k, top_p),
            image=SamplingParams(image_temperature, image_top_k, image_top_p),
            guidance=resolve_guidance(cfg_scale, cfg_image_scale, cfg_text_scale),
            codes_per_image=self.codes_per_image, seed=seed, stop_at_eot=stop_at_eot, ignore_eos=ignore_eos,
            return_logits=return_logits, mesh=self.mesh, rules=self.rules, stream_ids=stream_ids,
            image_decoding=image_decoding, jacobi_window=jacobi_window, jacobi_init=jacobi_init,
        )

    def generate(self, prompts: str | Sequence[str | Sequence[Segment]], *, modality: str = "text",
                 max_new_tokens: int | None = None, **kwargs) -> list[list[Any]]:
        """Continues each prompt; returns one list of segments (str or uint8 [H, W, 3]) per prompt.

        modality: "text" (never opens an image), "image" (one image, then stop),
        "any" (the model chooses, images only while a whole one fits).
        max_new_tokens: default codes_per_image + 2 for "image",
          128 for "text", 128 + codes_per_image + 2 for "any".
        Sampling: temperature/top_k/top_p for text and image_temperature/
          image_top_k/image_top_p for image codes (temperature 0 = greedy;
          defaults: greedy text, plain sampling of images).
        Guidance (image codes only): cfg_scale for the two-stream form, or
          cfg_image_scale/cfg_text_scale for Chameleon's three-stream form.
        seed: same seed, prompts and settings -> same output.
        image_decoding: "sequential" (one image code per forward pass) or "jacobi"
          (speculative Jacobi decoding: up to jacobi_window codes verified per pass;
          the same distribution, the same tokens when greedy); jacobi_init: its
          fresh drafts, "uniform" over the codes or "left" (the code to their left).
        Other keywords as in `generate_ids`.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = []
        for i, prompt in enumerate(prompts):
            try:
                ids.append(self.encode_prompt(prompt))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        result = self.generate_ids(ids, modality=modality, max_new_tokens=max_new_tokens, **kwargs)
        return self._segments_of_all(result.tokens)


def resolve_mesh(mesh, rules=None):
    """(Mesh or None, rules). A `MeshConfig` brings its rules and is built over the first devices:
    all of them when a size is -1, else as many as its sizes multiply to (data=1 alone: one device)."""
    from chameleon_jax.config import MeshConfig

    if mesh is None:
        return None, None
    if isinstance(mesh, MeshConfig):
        import jax

        from chameleon_jax.sharding import build_mesh

        sizes = (mesh.data, mesh.fsdp, mesh.tensor, mesh.dcn_data, mesh.dcn_fsdp, mesh.dcn_tensor)
        devices = jax.devices()
        if -1 not in sizes and math.prod(sizes) < len(devices):
            if jax.process_count() > 1:
                raise ValueError(f"a run of {jax.process_count()} processes needs a mesh over all {len(devices)} "
                                 f"devices, but the mesh sizes multiply to {math.prod(sizes)}: set e.g. mesh.data=-1")
            devices = devices[: math.prod(sizes)]  # sizes without -1 name how many devices to use
        return build_mesh(mesh, devices), mesh.rules if rules is None else rules
    return mesh, MeshConfig().rules if rules is None else rules


def default_max_new_tokens(modality: str, codes_per_image: int) -> int:
    image = codes_per_image + 2 if codes_per_image else 0
    return {"image": image, "text": DEFAULT_TEXT_TOKENS}.get(modality, DEFAULT_TEXT_TOKENS + image)


def _as_rgb_u8(image, index: int) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image {index} must be a uint8 array [H, W, 3], got {arr.dtype} {tuple(arr.shape)}")
    return arr


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def load_pipeline(path: str | os.PathLike, *, overrides: dict | None = None, mesh=None, rules=None) -> Pipeline:
    """The pipeline stored in a model directory.

    Reads DIR/config.json + DIR/params/ (the model), the vocabulary from
    DIR/vocab/ (trained models) or DIR/chameleon_tokenizer.json (imported
    checkpoints), and the image tokenizer from DIR/tokenizer/ when that holds
    one. overrides: model config fields to change at load time (see
    `chameleon_jax.checkpoint.load_model`), e.g. {"dtype": "bfloat16"}.
    mesh, rules: as for `Pipeline`; each parameter is restored straight into its shard.
    """
    from chameleon_jax.checkpoint import load_model
    from chameleon_jax.transformer import unstack_layers
    from chameleon_jax.vocab import Vocabulary

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if (path / "vocab" / "vocab.json").exists():
        vocab = Vocabulary.load(path / "vocab")
    elif (path / "chameleon_tokenizer.json").exists():
        vocab = Vocabulary.from_chameleon_tokenizer(path / "chameleon_tokenizer.json")
    else:
        raise FileNotFoundError(f"no vocabulary in {path} (expected vocab/vocab.json or chameleon_tokenizer.json)")
    tokenizer = None
    if (path / "tokenizer" / "tokenizer.json").exists():
        import vqvae

        tokenizer = vqvae.load_tokenizer(path / "tokenizer")
    # Generation runs the blocks one by one: a stacked (scan_layers) checkpoint is unstacked once here
    # rather than copied per decode step, and only one copy of the weights is kept.
    mesh, rules = resolve_mesh(mesh, rules)
    model = unstack_layers(load_model(path, mesh, rules, overrides=overrides))
    return Pipeline(model, vocab, tokenizer, mesh=mesh, rules=rules)

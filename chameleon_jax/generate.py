"""Generate from a model directory and write the result as a page (HTML and Markdown, images as PNG).

    python -m chameleon_jax.generate path=runs/demo/lm/model prompt="A red circle." modality=image out=page
    python -m chameleon_jax.generate path=... prompt="What is in <image>?" image=photo.png modality=text

`<image>` in the prompt marks where the images go (in order); without it the
images come first. `python -m chameleon_jax.generate --help` lists every option.

Batch inference over a JSONL file of prompts (see `chameleon_jax.batch_generate`):

    python -m chameleon_jax.generate path=... prompts=prompts.jsonl out=results batch_size=16

On a device mesh, with the training mesh fields and rules (`mesh.*`), and over
several processes (`cluster.*`, as `train.lm`):

    python -m chameleon_jax.generate path=... prompts=prompts.jsonl out=results mesh.tensor=8
"""

from __future__ import annotations

import dataclasses
import html
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from chameleon_jax import configlib
from chameleon_jax.config import MeshConfig
from chameleon_jax.configlib import ConfigError, param
from chameleon_jax.generation.distributed import DistributedConfig, is_primary, maybe_initialize
from vqvae.viz import save_png

IMAGE_MARK = "<image>"


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """One generation call from the command line."""

    path: str = param("", "model directory (config.json, params/, vocab/ or chameleon_tokenizer.json, tokenizer/)")
    prompt: str = param("", f"prompt text; {IMAGE_MARK} marks where each image goes (else images come first)")
    image: tuple[str, ...] = param((), "prompt image files, comma-separated")
    modality: Literal["text", "image", "any"] = param("any", "text: never draws; image: one image; any: model decides")
    max_new_tokens: int = param(0, "generation budget in tokens (0 = the default for the modality)")
    num_samples: int = param(1, "samples of the same prompt, generated as one batch")
    temperature: float = param(0.7, "text sampling temperature (0 = greedy)")
    top_k: int = param(0, "text top-k (0 = off)")
    top_p: float = param(0.9, "text nucleus probability (1 = off)")
    image_temperature: float = param(1.0, "image-code sampling temperature (0 = greedy)")
    image_top_k: int = param(0, "image-code top-k (0 = off)")
    image_top_p: float = param(1.0, "image-code nucleus probability (1 = off)")
    cfg_scale: float = param(1.0, "two-stream classifier-free guidance for image codes (1 = off)")
    cfg_image_scale: Optional[float] = param(None, "three-stream guidance: image-prompt scale (set it or cfg_text_scale)")
    cfg_text_scale: Optional[float] = param(None, "three-stream guidance: text-prompt scale")
    seed: int = param(0, "sampling seed (same seed, same output)")
    image_decoding: Literal["sequential", "jacobi"] = param(
        "sequential", "image codes one per forward pass, or by speculative Jacobi decoding (same distribution)")
    jacobi_window: int = param(16, "draft codes verified per forward pass with image_decoding=jacobi")
    out: str = param("generated", "output directory for the page and its PNGs")
    format: Literal["html", "md", "both"] = param("both", "page format: index.html, page.md or both")
    prompts: str = param("", "JSONL file of prompts, one document a line: batch inference into out/outputs.jsonl "
                              "(per-line modality, max_new_tokens, seed); replaces prompt= and image=")
    batch_size: int = param(8, "batch inference: prompts generated together (per length bucket)")
    progress: bool = param(True, "batch inference: show a progress bar with prompts/s and tokens/s")
    mesh: MeshConfig = param(
        MeshConfig(data=1, fsdp=1, tensor=1),
        "device mesh and rules, as in training: the sizes name how many devices (data=1 alone: one device; "
        "a -1 takes every device), e.g. mesh.tensor=8 or mesh.data=-1")
    cluster: DistributedConfig = param(DistributedConfig(), "multi-process runs (jax.distributed), as in train.lm")


def read_image(path: str) -> np.ndarray:
    """A prompt picture as RGB uint8 (chameleon_jax.data.read_image); a missing or unreadable file is a ConfigError."""
    from chameleon_jax.data import DataError
    from chameleon_jax.data import read_image as read_rgb

    try:
        return read_rgb(path)
    except FileNotFoundError:
        raise ConfigError(f"image file {path!r} does not exist") from None
    except DataError as e:
        raise ConfigError(str(e)) from None


def build_prompt(text: str, images: list[np.ndarray]) -> list:
    """Segments: the text split at each IMAGE_MARK with the images in between (or images first)."""
    marks = text.count(IMAGE_MARK)
    if marks == 0:
        return [*images, *([text] if text else [])]
    if marks != len(images):
        raise ConfigError(f"the prompt has {marks} {IMAGE_MARK} marks but {len(images)} images were given")
    segments: list = []
    for i, piece in enumerate(text.split(IMAGE_MARK)):
        if piece:
            segments.append(piece)
        if i < len(images):
            segments.append(images[i])
    return segments


def write_page(out: Path, prompt: list, results: list[list], meta: dict, fmt: str) -> list[Path]:
    """Writes out/index.html and/or out/page.md with the prompt and each sample; returns the files written."""
    from chameleon_jax.pipeline import ImageCodes

    out.mkdir(parents=True, exist_ok=True)

    def render(segments: list, stem: str) -> list[tuple[str, str]]:
        items = []
        for j, seg in enumerate(segments):
            if isinstance(seg, str):
                items.append(("text", seg))
            elif isinstance(seg, ImageCodes):
                h, w = seg.codes.shape
                items.append(("text", f"[an image of {h}x{w} codes; this model's tokenizer cannot draw it]"))
            else:
                name = f"{stem}_{j}.png"
                save_png(seg, out / name)
                items.append(("image", name))
        return items

    blocks = [("Prompt", render(prompt, "prompt"))]
    blocks += [(f"Sample {i + 1}", render(r, f"sample{i + 1}")) for i, r in enumerate(results)]
    written = []
    settings = ", ".join(f"{k}={v}" for k, v in meta.items())
    if fmt in ("md", "both"):
        lines = ["# Generation", "", f"`{settings}`", ""]
        for title, items in blocks:
            lines += [f"## {title}", ""]
            for kind, value in items:
                lines += [f"![{value}]({value})" if kind == "image" else value.replace("\n", "  \n"), ""]
        (out / "page.md").write_text("\n".join(lines))
        written.append(out / "page.md")
    if fmt in ("html", "both"):
        body = [f"<h1>Generation</h1><p><code>{html.escape(settings)}</code></p>"]
        for title, items in blocks:
            body.append(f"<h2>{html.escape(title)}</h2>")
            for kind, value in items:
                body.append(f'<img src="{html.escape(value)}" width="256" style="image-rendering:pixelated">'
                            if kind == "image" else f"<p style='white-space:pre-wrap'>{html.escape(value)}</p>")
        page = ("<!doctype html><html><head><meta charset='utf-8'><title>Generation</title></head><body>"
                + "\n".join(body) + "</body></html>\n")
        (out / "index.html").write_text(page)
        written.append(out / "index.html")
    return written


def sampling_kwargs(cfg: GenerateConfig) -> dict:
    """The `Pipeline.generate` keywords every prompt of a call shares."""
    return dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, image_temperature=cfg.image_temperature,
                image_top_k=cfg.image_top_k, image_top_p=cfg.image_top_p, cfg_scale=cfg.cfg_scale,
                cfg_image_scale=cfg.cfg_image_scale, cfg_text_scale=cfg.cfg_text_scale,
                image_decoding=cfg.image_decoding, jacobi_window=cfg.jacobi_window)


def run_batch(cfg: GenerateConfig) -> Path:
    """Batch inference over the JSONL file `cfg.prompts` into cfg.out/outputs.jsonl."""
    from chameleon_jax import batch_generate
    from chameleon_jax.pipeline import load_pipeline

    if cfg.prompt or cfg.image:
        raise ConfigError("give prompts= (a JSONL file) or prompt=/image=, not both")
    if not Path(cfg.prompts).is_file():
        raise ConfigError(f"prompts file {cfg.prompts!r} does not exist")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    pipe = load_pipeline(cfg.path, mesh=cfg.mesh)
    stats = batch_generate.run(pipe, cfg.prompts, cfg.out, batch_size=cfg.batch_size, modality=cfg.modality,
                               max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, progress=cfg.progress,
                               **sampling_kwargs(cfg))
    out = Path(cfg.out) / batch_generate.OUTPUTS
    if is_primary():
        print(f"wrote {out}: {stats['generated']} generated, {stats['skipped']} already done, {stats['errors']} "
              f"error record(s); {stats['new_tokens'] / max(stats['seconds'], 1e-9):.1f} tokens/s")
    return out


def run(cfg: GenerateConfig) -> list[Path]:
    from chameleon_jax.pipeline import load_pipeline

    if not cfg.path:
        raise ConfigError("set path= to a model directory")
    maybe_initialize(cfg.cluster)
    if cfg.prompts:
        return [run_batch(cfg)]
    if cfg.num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {cfg.num_samples}")
    prompt = build_prompt(cfg.prompt, [read_image(p) for p in cfg.image])
    if not prompt:
        raise ConfigError("give a prompt= and/or image=")
    pipe = load_pipeline(cfg.path, mesh=cfg.mesh)
    t0 = time.perf_counter()
    results = pipe.generate([prompt] * cfg.num_samples, modality=cfg.modality,
                            max_new_tokens=cfg.max_new_tokens or None, seed=cfg.seed, **sampling_kwargs(cfg))
    seconds = time.perf_counter() - t0
    if not is_primary():
        return []
    meta = {"model": cfg.path, "modality": cfg.modality, "seed": cfg.seed, "seconds": round(seconds, 2)}
    written = write_page(Path(cfg.out), prompt, results, meta, cfg.format)
    for path in written:
        print(f"wrote {path}")
    return written


def main(argv: list[str]) -> None:
    run(configlib.from_cli(argv, presets={"default": GenerateConfig}, default_preset="default"))


if __name__ == "__main__":
    configlib.main_guard(lambda: main(sys.argv[1:]))

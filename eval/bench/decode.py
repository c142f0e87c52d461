"""Decode speed: the compiled loop against Hugging Face transformers' `generate`, same weights.

    python -m eval.bench.decode [presets=tiny,small] [batches=1,8] [new_tokens=128] [out=bench.json]

For each model preset (random weights) a Hugging Face `ChameleonForConditionalGeneration`
of the same shape is built, saved with `save_pretrained` beside a small Chameleon-style
tokenizer.json, and imported with `python -m chameleon_jax.convert hf`, so both sides run
identical weights (the table shows their largest prefill logit difference). Both then
generate `new_tokens` greedy text tokens per row from the same prompts, in this process,
one after the other; tokens/s = rows * new_tokens / wall seconds (prefill included, the
compile / first call excluded, best of `repeats`; Hugging Face gets the best of the torch
thread counts in `hf_threads`). Where JAX runs on a GPU, Hugging Face runs on it too
(`hf_device`), synchronised before its clock is read. A second table gives seconds per
generated image (the image's tokens only, no pixel decoding) without and with two-stream
classifier-free guidance, for 64- and 1024-code images on `image_preset` with its context
raised to fit, each decoded sequentially and by speculative Jacobi decoding
(`image_decoding=jacobi`, `jacobi_window` drafts per pass), with the forward passes
per image (the loop's steps, the prefill counted as one).

`mesh="data=8"` (MeshConfig sizes, space-separated: `mesh="data=2 tensor=4"`) also times our
text decoding on that device mesh beside one device, same weights and prompts (on a CPU,
give fake devices: `XLA_FLAGS=--xla_force_host_platform_device_count=8`); `hf=false` skips
Hugging Face.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from chameleon_jax import configlib
from chameleon_jax.config import MODEL_PRESETS, ModelConfig
from chameleon_jax.configlib import param
from eval.bench.plan_common import parse_mesh

SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
TEXT_CHARS = "abcdefghijklmnopqrstuvwxyz ,.!?'0123456789"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What `python -m eval.bench.decode` measures."""

    presets: tuple[str, ...] = param(("tiny", "small"), "model presets to compare with Hugging Face")
    batches: tuple[int, ...] = param((1, 8), "batch sizes (rows generated together)")
    new_tokens: int = param(128, "text tokens generated per row")
    prompt_len: int = param(16, "prompt tokens per row (random text ids)")
    repeats: int = param(3, "timed runs per measurement; the best is reported")
    image_preset: str = param("small", "model preset for the per-image timings")
    image_codes: tuple[int, ...] = param((64, 1024), "codes per image for the per-image timings")
    cfg_scale: float = param(3.0, "guidance scale of the guided image timing")
    image_decodings: tuple[str, ...] = param(("sequential", "jacobi"), "image decodings timed per image")
    jacobi_window: int = param(16, "draft codes verified per forward pass by Jacobi decoding")
    image_temperature: float = param(1.0, "image-code sampling temperature of the per-image timings (0 = greedy)")
    scan_layers: bool = param(False, "import the blocks stacked for nnx.scan (else one by one)")
    hf_threads: tuple[int, ...] = param(
        (1, 0), "torch thread counts tried for Hugging Face on the CPU (0 = torch's default); its best is reported"
    )
    hf_device: str = param("auto", "where Hugging Face runs: cpu, cuda, or auto (cuda when JAX runs on a GPU and torch sees one)")
    mesh: str = param("", "also time our text decoding on this mesh, e.g. 'data=8' or 'data=2 tensor=4' (empty = off)")
    hf: bool = param(True, "also time Hugging Face generate (false: our decode only)")
    seed: int = param(0, "weights and prompt seed")
    out: str = param("", "also write the results as JSON to this path")


# --------------------------------------------------------------------------- a random HF twin


def image_token_name(code: int) -> str:
    """Chameleon's name for image code `code`: digits as letters A-J, then one trailing character."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def write_chameleon_tokenizer(path: Path, vocab_size: int, codebook_size: int) -> dict[str, int]:
    """A small tokenizer.json in the released file's layout (character pieces, no merges).

    Ids: <s> <pad> </s> <unk>, the image codes, <eoss> (eoi), <racm3:break> (boi),
    <reserved08706> (end of turn), then one piece per character. Returns name -> id.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = dict(SPECIALS)
    for code in range(codebook_size):
        vocab[image_token_name(code)] = len(vocab)
    specials = ["<eoss>", "<racm3:break>", "<reserved08706>"]
    for name in specials:
        vocab[name] = len(vocab)
    for ch in TEXT_CHARS:
        vocab[ch] = len(vocab)
    if len(vocab) > vocab_size:
        raise ValueError(f"a vocabulary of {vocab_size} ids cannot hold {len(vocab)} tokens; lower codebook_size")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(n, special=True) for n in [*SPECIALS, *specials]])
    tok.decoder = decoders.Fuse()
    tok.save(str(path))
    return vocab


def save_random_hf_chameleon(cfg: ModelConfig, directory: Path, *, codebook_size: int, seed: int = 0) -> dict[str, int]:
    """A randomly initialised HF ChameleonForConditionalGeneration of cfg's shape, saved to `directory`."""
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    directory.mkdir(parents=True, exist_ok=True)
    names = write_chameleon_tokenizer(directory / "tokenizer.json", cfg.vocab_size, codebook_size)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_dim:
        raise ValueError("Hugging Face Chameleon needs head_dim * num_heads == hidden_dim")
    hf_cfg = ChameleonConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, swin_norm=cfg.swin_norm,
        initializer_range=cfg.initializer_range, bos_token_id=0, pad_token_id=1, eos_token_id=2,
        vocabulary_map=names,
        vq_config=dict(embed_dim=8, num_embeddings=codebook_size, latent_channels=8, resolution=16,
                       base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1),
    )
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(hf_cfg).eval()
    model.save_pretrained(directory)
    return names


def convert(src: Path, dst: Path, *, scan_layers: bool) -> None:
    """`python -m chameleon_jax.convert hf SRC DST`, run in this process."""
    from chameleon_jax.convert.__main__ import main as convert_main

    argv = ["hf", str(src), str(dst)] + ([] if scan_layers else ["--no-scan-layers"])
    if convert_main(argv):
        raise RuntimeError(f"conversion of {src} failed")


# --------------------------------------------------------------------------- timing


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def hf_device(name: str) -> str:
    """The torch device Hugging Face runs on: `name`, with "auto" = "cuda" where JAX runs on a GPU too."""
    import jax
    import torch

    if name == "auto":
        return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise configlib.ConfigError(f"hf_device must be cpu, cuda or auto, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise configlib.ConfigError("hf_device=cuda, but torch sees no CUDA device")
    return name


def random_prompts(vocab, batch: int, length: int, rng: np.random.Generator) -> list[list[int]]:
    text_ids = np.flatnonzero(vocab.text_token_mask & ~np.isin(np.arange(vocab.size), [vocab.eos_id, vocab.eot_id]))
    return [[vocab.bos_id] + rng.choice(text_ids, length - 1).tolist() for _ in range(batch)]


def bench_preset(preset: str, cfg: BenchConfig, work: Path) -> tuple[list[dict], Path]:
    import torch
    from transformers import ChameleonForConditionalGeneration

    from chameleon_jax.pipeline import load_pipeline

    model_cfg = MODEL_PRESETS[preset]()
    codebook = min(8192, model_cfg.vocab_size // 2)
    hf_dir, our_dir = work / f"{preset}_hf", work / f"{preset}_ours"
    save_random_hf_chameleon(model_cfg, hf_dir, codebook_size=codebook, seed=cfg.seed)
    convert(hf_dir, our_dir, scan_layers=cfg.scan_layers)
    pipe = load_pipeline(our_dir)
    mesh_pipe = load_pipeline(our_dir, mesh=parse_mesh(cfg.mesh)) if cfg.mesh else None
    device = hf_device(cfg.hf_device)
    hf = ChameleonForConditionalGeneration.from_pretrained(hf_dir).eval().to(device)
    rng = np.random.default_rng(cfg.seed)
    default_threads = torch.get_num_threads()
    rows = []
    for batch in cfg.batches:
        prompts = random_prompts(pipe.vocab, batch, cfg.prompt_len, rng)
        input_ids = torch.tensor(prompts, device=device)

        def ours(pipe=pipe):
            out = pipe.generate_ids(prompts, modality="text", max_new_tokens=cfg.new_tokens, ignore_eos=True)
            assert all(len(t) == cfg.new_tokens for t in out.tokens)
            return out

        def theirs():
            with torch.inference_mode():
                out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                  max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, pad_token_id=1)
            assert out.shape[1] == cfg.prompt_len + cfg.new_tokens
            if device != "cpu":
                torch.cuda.synchronize()
            return out

        with torch.inference_mode():
            hf_logits = hf(input_ids[:1]).logits[0].float().cpu().numpy()
        our_logits = np.asarray(pipe.model(np.asarray(prompts[:1], np.int32))[0])
        text = ~pipe.vocab.image_token_mask  # HF masks image ids in its logits
        diff = float(np.abs(hf_logits[:, : pipe.vocab.size][:, text] - our_logits[:, : pipe.vocab.size][:, text]).max())
        t0 = time.perf_counter()
        ours()
        first_call = time.perf_counter() - t0
        ours_s = best_seconds(ours, cfg.repeats)
        # Torch's intra-op threads spin, which is slow on busy shared cores: try each count, keep the best.
        theirs_s, best_threads = float("inf"), None
        for threads in (cfg.hf_threads if device == "cpu" else (0,)) if cfg.hf else ():
            torch.set_num_threads(threads or default_threads)
            seconds = best_seconds(theirs, cfg.repeats)
            if seconds < theirs_s:
                theirs_s, best_threads = seconds, torch.get_num_threads()
        torch.set_num_threads(default_threads)
        tokens = batch * cfg.new_tokens
        rows.append(dict(preset=preset, batch=batch, hf_device=device, new_tokens=cfg.new_tokens, ours_tokens_per_s=tokens / ours_s,
                         hf_tokens_per_s=tokens / theirs_s, speedup=theirs_s / ours_s, hf_threads=best_threads,
                         ours_first_call_s=first_call, max_prefill_logit_diff=diff))
        if mesh_pipe is not None:
            same = ours(mesh_pipe).tokens == ours().tokens  # greedy: the mesh must choose the same tokens
            mesh_s = best_seconds(lambda: ours(mesh_pipe), cfg.repeats)
            rows[-1].update(mesh=cfg.mesh, mesh_devices=mesh_pipe.mesh.size, mesh_tokens_per_s=tokens / mesh_s,
                            mesh_over_one_device=ours_s / mesh_s, mesh_same_tokens=same)
        print_row(rows[-1])
    return rows, our_dir


def bench_images(cfg: BenchConfig, model_dir: Path) -> list[dict]:
    from chameleon_jax.checkpoint import load_model
    from chameleon_jax.generation import Guidance, SamplingParams, freeze, generate_tokens
    from chameleon_jax.vocab import Vocabulary

    vocab = Vocabulary.from_chameleon_tokenizer(model_dir / "chameleon_tokenizer.json")
    context = cfg.prompt_len + max(cfg.image_codes) + 2
    model = load_model(model_dir, overrides={"max_seq_len": max(context, MODEL_PRESETS[cfg.image_preset]().max_seq_len)})
    model = freeze(model)  # split once, as the Pipeline does: both timings are the decode alone
    prompts = random_prompts(vocab, 1, cfg.prompt_len, np.random.default_rng(cfg.seed))
    rows = []
    for codes in cfg.image_codes:
        row = dict(preset=cfg.image_preset, codes_per_image=codes)
        for name, guidance in (("plain", Guidance()), ("guided", Guidance("two", scale=cfg.cfg_scale))):
            for decoding in cfg.image_decodings:
                passes = []

                def one_image():
                    out = generate_tokens(model, vocab, prompts, modality="image", max_new_tokens=codes + 2,
                                          image=SamplingParams(cfg.image_temperature), guidance=guidance,
                                          codes_per_image=codes, image_decoding=decoding,
                                          jacobi_window=cfg.jacobi_window)
                    assert len(out.tokens[0]) == codes + 2
                    passes.append(out.steps)
                key = name if decoding == "sequential" else f"{name}_{decoding}"
                row[f"{key}_s_per_image"] = best_seconds(one_image, cfg.repeats)
                row[f"{key}_passes_per_image"] = float(np.mean(passes))
        if "sequential" in cfg.image_decodings:
            row["guided_over_plain"] = row["guided_s_per_image"] / row["plain_s_per_image"]
        rows.append(row)
        print_row(row)
    return rows


def print_row(row: dict) -> None:
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def main(argv: list[str]) -> dict:
    cfg = configlib.apply_overrides(BenchConfig(), argv)
    import jax
    import torch

    if cfg.mesh:
        sizes = parse_mesh(cfg.mesh)
        need = sizes.data * sizes.fsdp * sizes.tensor
        if jax.device_count() < need:
            raise configlib.ConfigError(f"mesh={cfg.mesh!r} needs {need} devices, jax sees {jax.device_count()} "
                                        f"(on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count={need})")

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
          f"on {hf_device(cfg.hf_device)} with {torch.get_num_threads()} threads", flush=True)
    results: dict = {"config": configlib.to_dict(cfg), "text": [], "images": []}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for preset in cfg.presets:
            rows, dirs[preset] = bench_preset(preset, cfg, Path(tmp))
            results["text"].extend(rows)
        if cfg.image_codes:
            if cfg.image_preset not in dirs:
                model_cfg = MODEL_PRESETS[cfg.image_preset]()
                save_random_hf_chameleon(model_cfg, Path(tmp) / "img_hf", codebook_size=model_cfg.vocab_size // 2)
                convert(Path(tmp) / "img_hf", Path(tmp) / "img_ours", scan_layers=cfg.scan_layers)
                dirs[cfg.image_preset] = Path(tmp) / "img_ours"
            results["images"] = bench_images(cfg, dirs[cfg.image_preset])
    print_tables(results)
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_tables(results: dict) -> None:
    print("\ntext decoding, greedy (tokens/s; best of the timed runs)")
    print(f"{'preset':<8}{'batch':>6}{'ours':>12}{'HF':>12}{'HF thr':>8}{'ours/HF':>10}{'logit diff':>12}")
    for r in results["text"]:
        if not r["hf_tokens_per_s"]:  # hf=false
            continue
        print(f"{r['preset']:<8}{r['batch']:>6}{r['ours_tokens_per_s']:>12.1f}{r['hf_tokens_per_s']:>12.1f}{r['hf_threads']!s:>8}"
              f"{r['speedup']:>10.2f}{r['max_prefill_logit_diff']:>12.2e}")
    meshed = [r for r in results["text"] if "mesh" in r]
    if meshed:
        print(f"\nours on a mesh against one device (tokens/s)")
        print(f"{'preset':<8}{'batch':>6}{'mesh':>18}{'devices':>9}{'1 device':>12}{'mesh':>12}{'ratio':>8}{'same':>6}")
        for r in meshed:
            print(f"{r['preset']:<8}{r['batch']:>6}{r['mesh']:>18}{r['mesh_devices']:>9}{r['ours_tokens_per_s']:>12.1f}"
                  f"{r['mesh_tokens_per_s']:>12.1f}{r['mesh_over_one_device']:>8.2f}{str(r['mesh_same_tokens']):>6}")
    if results["images"] and "guided_over_plain" in results["images"][0]:
        print("\nseconds per image (batch 1, sampled codes)")
        print(f"{'preset':<8}{'codes':>6}{'plain':>10}{'guided':>10}{'ratio':>8}")
        for r in results["images"]:
            print(f"{r['preset']:<8}{r['codes_per_image']:>6}{r['plain_s_per_image']:>10.3f}"
                  f"{r['guided_s_per_image']:>10.3f}{r['guided_over_plain']:>8.2f}")
    if results["images"] and "plain_jacobi_s_per_image" in results["images"][0] and "plain_s_per_image" in results["images"][0]:
        print("\nsequential vs Jacobi image decoding (batch 1): forward passes and seconds per image")
        print(f"{'preset':<8}{'codes':>6}{'stream':>8}{'passes seq':>12}{'passes jac':>12}{'s seq':>9}{'s jac':>9}"
              f"{'speedup':>9}")
        for r in results["images"]:
            for name in ("plain", "guided"):
                print(f"{r['preset']:<8}{r['codes_per_image']:>6}{name:>8}{r[f'{name}_passes_per_image']:>12.1f}"
                      f"{r[f'{name}_jacobi_passes_per_image']:>12.1f}{r[f'{name}_s_per_image']:>9.3f}"
                      f"{r[f'{name}_jacobi_s_per_image']:>9.3f}"
                      f"{r[f'{name}_s_per_image'] / r[f'{name}_jacobi_s_per_image']:>9.2f}")


if __name__ == "__main__":
    configlib.main_guard(lambda: main(sys.argv[1:]))

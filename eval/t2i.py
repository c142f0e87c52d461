"""Text to image: the judge's exact-match accuracy on pictures generated from prompts.

`python -m eval.t2i run_dir=runs/demo [num_examples=100] [cfg_scale=1.5] [image_temperature=0]` writes
`<run_dir>/eval/t2i.json`: the prompts are written as training writes them
(`shapes.t2i_prompt`, each cell named before its object), one per example,
seeded by the example's index. It gives accuracy on seen (colour, shape) pairs (the test
split) and on held-out pairs (the heldout split), each with guidance
(`cfg_scale`) and without (scale 1), the judge's object-count accuracy, and a
grid of prompts beside generations. Per asked-for object it gives how often the judge
read an object in its cell and its colour, shape and size right (`t2i_object_*_accuracy_*`),
which shows how held-out pairs fail. For each it also records the decoding's cost:
forward passes and seconds per picture (`image_decoding=jacobi` against the default
`sequential` shows what speculative Jacobi decoding saves).

With `image_candidates=n` above 1 each prompt gets n pictures and the model keeps the one
whose prompt it reads likeliest as that picture's caption (`generation/rerank.py`). The
headline figures are the kept pictures'; `*_first_candidate` scores the first picture alone
(the plain decoding), and `*_any_candidate` says how often the judge finds any of the n
right (a ceiling on what choosing can reach, not a figure of the system: the judge does
not choose).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from chameleon_jax.configlib import ConfigError
from chameleon_jax.data import shapes
from chameleon_jax.generation import rerank
from eval import common

# Seed offset between candidate pictures: candidate k samples with seed `cfg.seed + k * CANDIDATE_SEED_STRIDE
# + batch`, so no two candidates (nor two batches of one) share a random stream.
CANDIDATE_SEED_STRIDE = 100_003


def generate_images(pipe, prompts: list[str], cfg: common.EvalConfig, cfg_scale: float, desc: str,
                    timings: list | None = None) -> list:
    results = common.generate_all(
        pipe, [[p] for p in prompts], cfg, desc, timings=timings, modality="image",
        max_new_tokens=pipe.codes_per_image + 2,
        temperature=cfg.temperature, image_temperature=cfg.image_temperature, image_top_k=cfg.image_top_k,
        cfg_scale=cfg_scale, image_decoding=cfg.image_decoding, jacobi_window=cfg.jacobi_window,
    )
    images = [common.images_of(r) for r in results]
    return [imgs[0] if imgs else None for imgs in images]


def draw_best_of(pipe, prompts: list[str], cfg: common.EvalConfig, cfg_scale: float, desc: str,
                 timings: list | None = None) -> tuple[list, list[list]]:
    """The kept picture of each prompt, and every candidate ([candidate][prompt]).

    The first candidate is drawn with `cfg`'s own decoding (its `timings` are recorded);
    with `cfg.image_candidates` above 1 the others are sampled at `cfg.candidate_temperature`,
    and `rerank` keeps, per prompt, the candidate whose prompt the model reads likeliest
    as its caption.
    """
    if cfg.image_candidates < 1:
        raise ConfigError(f"image_candidates must be at least 1, got {cfg.image_candidates}")
    first = generate_images(pipe, prompts, cfg, cfg_scale, desc, timings)
    if cfg.image_candidates == 1:
        return first, [first]
    if cfg.candidate_temperature <= 0:
        raise ConfigError(f"candidate_temperature must be above 0 to draw {cfg.image_candidates} different "
                          f"candidates, got {cfg.candidate_temperature}")
    candidates = [first]
    for k in range(1, cfg.image_candidates):
        sampled = dataclasses.replace(cfg, seed=cfg.seed + k * CANDIDATE_SEED_STRIDE,
                                      image_temperature=cfg.candidate_temperature)
        candidates.append(generate_images(pipe, prompts, sampled, cfg_scale, f"{desc} candidate {k + 1}"))
    # One call for every (candidate, prompt) pair: one compiled scoring program for all of them.
    nll = rerank.caption_nll(pipe, [img for c in candidates for img in c], prompts * len(candidates), cfg.batch_size)
    nll = nll.reshape(len(candidates), len(prompts))
    pick = rerank.choose(nll)
    return [candidates[pick[i]][i] for i in range(len(prompts))], candidates


def decode_cost(name: str, timings: list) -> dict[str, float]:
    """Forward passes per picture and seconds per picture of one run of `generate_images`.

    Rows of a batch advance in the same passes, so a batch's passes are each of its
    pictures' passes. Seconds leave out the first batch of each compiled shape (rows,
    padded prompt length), whose call compiles the loop; when every batch is such a
    first, all of them count.
    """
    seen, timed = set(), []
    for rows, passes, seconds, shape in timings:
        if shape in seen:
            timed.append((rows, seconds))
        seen.add(shape)
    timed = timed or [(rows, seconds) for rows, _, seconds, _ in timings]
    return {
        f"{name}_forward_passes_per_image": sum(r * p for r, p, _, _ in timings) / sum(t[0] for t in timings),
        f"{name}_seconds_per_image": sum(s for _, s in timed) / sum(r for r, _ in timed),
    }


OBJECT_ATTRIBUTES = ("color", "shape", "size")


def judge_all(images: list) -> list:
    """The judge's reading of each picture (None where there is no picture)."""
    return [shapes.judge(img) if img is not None else None for img in images]


def score(images: list, examples: list, readings: list | None = None
          ) -> tuple[list[bool], list[bool], dict[str, list[bool]]]:
    """Exact match and object count per picture, and per asked-for object whether the judge read
    an object in its cell and which of its attributes came out right ("cell", "color", ...).
    `readings`: the pictures' `judge_all`, when already known.

    The per-object figures say how a picture went wrong: on held-out (colour, shape) pairs they
    tell a model that keeps the colour and draws a shape it has seen in that colour from one that
    keeps the shape."""
    exact, count = [], []
    per_object: dict[str, list[bool]] = {k: [] for k in ("cell", *OBJECT_ATTRIBUTES)}
    readings = judge_all(images) if readings is None else readings
    for found, ex in zip(readings, examples):
        truth = shapes.example_objects(ex)
        objects = found.objects if found is not None else []
        exact.append(found is not None and shapes.canonical(objects) == shapes.canonical(truth))
        count.append(found is not None and found.num_found == len(truth))
        at = {(o.row, o.col): o for o in objects}
        for o in truth:
            drawn = at.get((o.row, o.col))
            per_object["cell"].append(drawn is not None)
            for attr in OBJECT_ATTRIBUTES:
                per_object[attr].append(drawn is not None and getattr(drawn, attr) == getattr(o, attr))
    return exact, count, per_object


def evaluate(pipe, cfg: common.EvalConfig, num_samples: int = 16) -> dict:
    cfg = common.for_pipeline(cfg, pipe)
    out: dict = {}
    samples = []
    scales = {"": cfg.cfg_scale, "_no_guidance": 1.0} if cfg.cfg_scale != 1.0 else {"": 1.0}
    for split, tag in (("test", "seen"), ("heldout", "heldout")):
        examples = common.load_examples(cfg, split)
        prompts = [shapes.t2i_prompt(ex, np.random.default_rng(int(ex["index"]))) for ex in examples]
        for suffix, scale in scales.items():
            timings: list = []
            start = time.perf_counter()
            images, candidates = draw_best_of(pipe, prompts, cfg, scale, f"t2i {tag}{suffix}", timings)
            out.update(decode_cost(f"t2i_{tag}{suffix}", timings))
            # Each picture is judged once; the kept ones are candidates, so their readings are known.
            readings = [judge_all(c) for c in candidates]
            reading_of = {id(img): r for c, rs in zip(candidates, readings) for img, r in zip(c, rs)}
            exact, count, per_object = score(images, examples, [reading_of[id(img)] for img in images])
            if len(candidates) > 1:
                out[f"t2i_{tag}{suffix}_seconds_per_prompt"] = (time.perf_counter() - start) / len(prompts)
                each = [score(c, examples, rs)[0] for c, rs in zip(candidates, readings)]
                out[f"t2i_judge_accuracy_{tag}{suffix}_first_candidate"] = sum(each[0]) / len(each[0])
                out[f"t2i_judge_accuracy_{tag}{suffix}_any_candidate"] = float(np.mean(np.any(each, axis=0)))
            out[f"t2i_judge_accuracy_{tag}{suffix}"] = sum(exact) / len(exact)
            out[f"t2i_count_accuracy_{tag}{suffix}"] = sum(count) / len(count)
            for attr, right in per_object.items():
                out[f"t2i_object_{attr}_accuracy_{tag}{suffix}"] = sum(right) / max(len(right), 1)
            out[f"t2i_num_{tag}"] = len(exact)
            if suffix == "":
                out.update(common.accuracy_by_objects(
                    f"t2i_judge_accuracy_{tag}", exact, [ex["num_objects"] for ex in examples]))
                for i, (p, img, ok) in enumerate(list(zip(prompts, images, exact))[: num_samples // 2]):
                    if img is not None:
                        rel = common.save_png(cfg.run_dir, f"eval/t2i/{tag}_{i}.png", img)
                        samples.append({"prompt": p, "image": rel, "generated": True, "correct": ok})
    out["image_decoding"] = cfg.image_decoding
    out["cfg_scale"] = cfg.cfg_scale
    out["image_temperature"] = cfg.image_temperature
    out["image_candidates"] = cfg.image_candidates
    if cfg.image_candidates > 1:
        out["candidate_temperature"] = cfg.candidate_temperature
    out["samples"] = samples
    return out


if __name__ == "__main__":
    common.cli("t2i", evaluate, num_examples=100)

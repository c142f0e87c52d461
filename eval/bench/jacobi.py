"""Jacobi against sequential image decoding on a trained model: passes, cost of a pass, seconds.

    python -m eval.bench.jacobi model_dir=runs/demo/lm/model [windows=4,8,16] [inits=uniform,left]
        [cfg_scales=1.0,1.5] [image_temperature=0] [rounds=7] [out=jacobi.json]

One picture at a time for each prompt, every setting compiled first. Then `rounds` rounds,
each running every setting over all prompts once, back to back: a noisy machine slows the
settings of a round alike, so each Jacobi setting's speed is the median over rounds of
(sequential seconds / its seconds) in the same round. For each setting the table gives the
forward passes per picture (the prefill counted as one), the milliseconds a pass, what a
pass costs in sequential passes (`pass_cost`), and the passes at which Jacobi would break
even (`break_even_passes` = sequential passes / pass_cost). Jacobi is faster exactly where
it needs fewer passes than that: on a CPU a pass of W + 1 positions costs several
single-token passes of a small model, while on an accelerator it costs about one.
`same_tokens` says whether a setting drew the sequential pictures, as greedy Jacobi must (None when
sampled: the two decodings draw from one law, not the same samples).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np

from chameleon_jax import configlib
from chameleon_jax.configlib import param

SHAPES_PROMPTS = (
    "in the middle, a large red circle",
    "at the top left, a small blue square",
    "at the bottom, a large green triangle and at the top right, a small yellow circle",
    "on the left, a small purple star",
)


@dataclasses.dataclass(frozen=True)
class JacobiBenchConfig:
    """What `python -m eval.bench.jacobi` measures."""

    model_dir: str = param("runs/demo/lm/model", "a trained model directory (with its image tokenizer)")
    prompts: tuple[str, ...] = param(SHAPES_PROMPTS, "text prompts, one picture each (the default suits the Shapes demo)")
    windows: tuple[int, ...] = param((4, 8, 16), "Jacobi windows (drafts verified per pass)")
    inits: tuple[str, ...] = param(("uniform", "left"), "Jacobi fresh-draft rules (jacobi.INITS)")
    cfg_scales: tuple[float, ...] = param((1.0, 1.5), "guidance scales (1.0 = no guidance rows)")
    image_temperature: float = param(0.0, "image sampling temperature (0 = greedy: Jacobi draws the sequential picture)")
    rounds: int = param(7, "timed rounds; each runs every setting once over all prompts")
    seed: int = param(0, "sampling seed")
    out: str = param("", "also write the results as JSON to this path")


def main(argv: list[str]) -> list[dict]:
    cfg = configlib.apply_overrides(JacobiBenchConfig(), argv)
    from chameleon_jax.pipeline import load_pipeline

    pipe = load_pipeline(cfg.model_dir)
    codes = pipe.codes_per_image
    prompts = [pipe.encode_prompt([text]) for text in cfg.prompts]
    rows = []
    for scale in cfg.cfg_scales:
        settings = [dict(image_decoding="sequential")] + [
            dict(image_decoding="jacobi", jacobi_window=w, jacobi_init=init) for init in cfg.inits for w in cfg.windows]

        def run(setting):
            steps, tokens, start = [], [], time.perf_counter()
            for p in prompts:
                out = pipe.generate_ids([p], modality="image", image_temperature=cfg.image_temperature,
                                        cfg_scale=scale, seed=cfg.seed, **setting)
                steps.append(out.steps)
                tokens.append(out.tokens[0])
            return time.perf_counter() - start, float(np.mean(steps)), tokens

        tokens = [run(setting)[2] for setting in settings]  # compiles every prompt length
        seconds = np.zeros((cfg.rounds, len(settings)))
        passes = [0.0] * len(settings)
        for r in range(cfg.rounds):
            for i, setting in enumerate(settings):
                seconds[r, i], passes[i], _ = run(setting)
        seq_pass = np.median(seconds[:, 0]) / len(prompts) / passes[0]
        for i, setting in enumerate(settings):
            per_pass = np.median(seconds[:, i]) / len(prompts) / passes[i]
            cost = per_pass / seq_pass
            rows.append(dict(
                cfg_scale=scale, decoding=setting["image_decoding"], window=setting.get("jacobi_window", 0),
                init=setting.get("jacobi_init", ""), passes=passes[i], ms_per_pass=1e3 * per_pass, pass_cost=cost,
                break_even_passes=passes[0] / cost,
                same_tokens=tokens[i] == tokens[0] if cfg.image_temperature == 0 else None,  # sampled: other draws
                seconds_per_picture=float(np.median(seconds[:, i])) / len(prompts),
                speed=float(np.median(seconds[:, 0] / seconds[:, i])),
            ))
    print(f"{cfg.model_dir}: {codes} codes a picture, {len(prompts)} prompts one at a time, image temperature "
          f"{cfg.image_temperature}, median of {cfg.rounds} interleaved rounds")
    print("| guidance | decoding | window | init | passes | ms/pass | pass cost | break-even passes | s/picture | speed | "
          "same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['cfg_scale']} | {row['decoding']} | {row['window'] or ''} | {row['init']} | {row['passes']:.1f} | "
              f"{row['ms_per_pass']:.2f} | {row['pass_cost']:.2f} | {row['break_even_passes']:.1f} | "
              f"{row['seconds_per_picture']:.4f} | {row['speed']:.2f}x | {row['same_tokens']} |")
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump({"config": configlib.to_dict(cfg), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    configlib.main_guard(lambda: main(sys.argv[1:]))

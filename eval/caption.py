"""Captioning: generate a caption for each picture and read the attributes back from it.

`python -m eval.caption run_dir=runs/demo [num_examples=200] [split=test]` writes
`<run_dir>/eval/caption.json`: per-attribute accuracy (colour, shape, size,
position, count) of the attributes parsed from the generated captions, exact
match of all attributes, the fraction of captions that parse at all, and
BLEU-4 and CIDEr-D against the example's reference captions.
"""

from __future__ import annotations

from typing import Sequence

from chameleon_jax.data import shapes
from eval import common
from eval.text_metrics import bleu4, cider_d

ATTRIBUTES = {
    "color": lambda o: o.color,
    "shape": lambda o: o.shape,
    "size": lambda o: o.size,
    "position": lambda o: (o.row, o.col),
}


def score_caption(parsed: Sequence[shapes.ObjectAttrs] | None, truth: Sequence[shapes.ObjectAttrs]) -> dict[str, bool]:
    """Which attributes a caption got right: each compared as the multiset over the picture's objects."""
    if parsed is None:
        return {**{k: False for k in ATTRIBUTES}, "count": False, "exact": False}
    out = {k: sorted(map(f, parsed)) == sorted(map(f, truth)) for k, f in ATTRIBUTES.items()}
    out["count"] = len(parsed) == len(truth)
    out["exact"] = shapes.canonical(parsed) == shapes.canonical(truth)
    return out


def evaluate(pipe, cfg: common.EvalConfig, num_samples: int = 16) -> dict:
    cfg = common.for_pipeline(cfg, pipe)
    examples = common.load_examples(cfg)
    results = common.generate_all(
        pipe, [[ex["image"]] for ex in examples], cfg, "caption",
        modality="text", max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
    )
    captions = [common.text_of(r) for r in results]
    scores = [score_caption(shapes.parse_caption(c), shapes.example_objects(ex)) for c, ex in zip(captions, examples)]
    n = len(examples)
    out = {f"caption_{k}_accuracy": sum(s[k] for s in scores) / n for k in (*ATTRIBUTES, "count")}
    out["caption_exact_match"] = sum(s["exact"] for s in scores) / n
    out.update(common.accuracy_by_objects("caption_exact_match", [s["exact"] for s in scores],
                                          [ex["num_objects"] for ex in examples]))
    out["caption_parse_rate"] = sum(shapes.parse_caption(c) is not None for c in captions) / n
    refs = [list(ex["captions"]) for ex in examples]
    out["caption_bleu4"] = bleu4(captions, refs)
    out["caption_cider_d"] = cider_d(captions, refs)
    out["num_examples"] = n
    out["samples"] = [
        {"image": common.save_png(cfg.run_dir, f"eval/caption/{i}.png", ex["image"]), "text": c,
         "reference": ex["captions"][0], "correct": s["exact"]}
        for i, (ex, c, s) in enumerate(zip(examples[:num_samples], captions, scores))
    ]
    return out


if __name__ == "__main__":
    common.cli("caption", evaluate)

"""Visual question answering: exact-match accuracy of generated answers, overall and per question type.

`python -m eval.vqa run_dir=runs/demo [num_examples=200]` writes `<run_dir>/eval/vqa.json`.
`num_examples` counts pictures; every question of each picture is asked.
"""

from __future__ import annotations

from collections import defaultdict

from chameleon_jax.data import shapes
from eval import common


def normalise(answer: str) -> str:
    return " ".join(answer.lower().strip().rstrip(".!?").split())


def evaluate(pipe, cfg: common.EvalConfig, num_samples: int = 16) -> dict:
    cfg = common.for_pipeline(cfg, pipe)
    docs = [d for ex in common.load_examples(cfg) for d in shapes.vqa_documents(ex)]
    prompts = [[d.segments[0].text, d.segments[1].image] for d in docs]  # question, then picture
    results = common.generate_all(
        pipe, prompts, cfg, "vqa", modality="text", max_new_tokens=16, temperature=cfg.temperature
    )
    answers = [common.text_of(r) for r in results]
    right = [normalise(a) == normalise(d.meta["answer"]) for a, d in zip(answers, docs)]
    by_type: dict[str, list[bool]] = defaultdict(list)
    for ok, d in zip(right, docs):
        by_type[d.meta["question_type"]].append(ok)
    out = {"vqa_accuracy": sum(right) / len(right), "num_questions": len(right)}
    out.update({f"vqa_{t}_accuracy": sum(v) / len(v) for t, v in sorted(by_type.items())})
    out.update(common.accuracy_by_objects("vqa_accuracy", right, [len(d.meta["objects"]) for d in docs]))
    out["samples"] = [
        {"image": common.save_png(cfg.run_dir, f"eval/vqa/{i}.png", d.segments[1].image),
         "question": d.meta["question"], "answer": a, "reference": d.meta["answer"], "correct": ok}
        for i, (d, a, ok) in enumerate(list(zip(docs, answers, right))[:num_samples])
    ]
    return out


if __name__ == "__main__":
    common.cli("vqa", evaluate)

"""Interleaved generation: given a document's first picture and edit sentence, generate the rest.

Documents are Shapes edit stories (picture, "the red circle becomes blue.",
picture, ...). The model sees the first picture and sentence and generates
freely (text and images); the k-th generated picture is judged against the
scene after the k-th edit. `python -m eval.interleaved run_dir=runs/demo`
writes `<run_dir>/eval/interleaved.json`.
"""

from __future__ import annotations


from chameleon_jax.data import shapes
from eval import common


def evaluate(pipe, cfg: common.EvalConfig, num_documents: int = 4) -> dict:
    cfg = common.for_pipeline(cfg, pipe)
    docs = shapes.interleaved_documents(cfg.split, cfg.image_size, cfg.data_dir or None, n=max(cfg.num_examples, 1),
                                        backend=cfg.shapes_backend)
    prompts = [[d.segments[0].image, d.segments[1].text] for d in docs]
    budget = 2 * (pipe.codes_per_image + 2) + cfg.max_new_tokens
    results = common.generate_all(
        pipe, prompts, cfg, "interleaved", modality="any", max_new_tokens=budget, temperature=cfg.temperature,
        image_temperature=cfg.image_temperature, image_top_k=cfg.image_top_k, cfg_scale=cfg.cfg_scale,
        image_decoding=cfg.image_decoding, jacobi_window=cfg.jacobi_window,
    )
    first_ok, all_ok, expected, matched = [], [], 0, 0
    for d, r in zip(docs, results):
        states = d.meta["objects"][1:]  # scenes after each edit
        images = common.images_of(r)
        oks = [i < len(images) and shapes.judge_matches(images[i], s) for i, s in enumerate(states)]
        first_ok.append(oks[0])
        all_ok.append(all(oks))
        expected += len(oks)
        matched += sum(oks)
    out = {
        "interleaved_first_image_accuracy": sum(first_ok) / len(docs),
        "interleaved_image_accuracy": matched / max(expected, 1),
        "interleaved_document_accuracy": sum(all_ok) / len(docs),
        "num_documents": len(docs),
    }
    shown = []
    for j, (d, r) in enumerate(list(zip(docs, results))[:num_documents]):
        segs = [{"image": common.save_png(cfg.run_dir, f"eval/interleaved/{j}_prompt.png", d.segments[0].image)},
                {"text": d.segments[1].text}]
        for k, s in enumerate(r):
            if isinstance(s, str):
                segs.append({"text": s, "generated": True})
            else:
                segs.append({"image": common.save_png(cfg.run_dir, f"eval/interleaved/{j}_{k}.png", s),
                             "generated": True})
        shown.append({"segments": segs})
    out["documents"] = shown
    return out


if __name__ == "__main__":
    common.cli("interleaved", evaluate, num_examples=50)

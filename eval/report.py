"""The run report: one HTML page with the headline figures, pictures and curves of a run.

`python -m eval.report run_dir=runs/demo` (re)writes `<run_dir>/report.html` from
what the stages left in the run directory: `metrics.json`, `eval/*.json` (each
may carry `samples` that name PNG files relative to the run directory) and the
training logs (loss curves are drawn here).
"""

from __future__ import annotations

import html
import json
import os
import sys
from pathlib import Path
from typing import Any

from train.metrics import plot_curves

# The figures a reader looks at first (metrics.json holds many more).
HEADLINE = (
    "judge_accuracy_ground_truth", "vq_psnr_db", "vq_codebook_usage", "vq_judge_accuracy",
    "vq_judge_accuracy_heldout", "caption_exact_match",
    "caption_cider_d", "vqa_accuracy", "t2i_judge_accuracy_seen", "t2i_judge_accuracy_heldout",
    "t2i_judge_accuracy_seen_first_candidate", "t2i_judge_accuracy_heldout_first_candidate",
    "t2i_judge_accuracy_seen_no_guidance", "interleaved_image_accuracy", "text_perplexity", "image_perplexity",
)

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{margin-bottom:0}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse}td,th{padding:.25em .8em;border-bottom:1px solid #eee;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{width:160px;font-size:12px}
.card img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ddd}
.ok{color:#080}.bad{color:#b00}.doc{display:flex;align-items:center;gap:10px;flex-wrap:wrap}
.doc img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ddd}
.gen{outline:3px solid #39f}
"""


def _img(src: str, cls: str = "", style: str = "") -> str:
    return f'<img src="{html.escape(src)}" class="{cls}" style="{style}" loading="lazy">'


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = []
    for k in metrics:
        v = metrics[k]
        shown = f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))
        rows.append(f"<tr><td>{html.escape(k)}</td><td class=num>{shown}</td></tr>")
    return "<table><tr><th>figure</th><th>value</th></tr>" + "".join(rows) + "</table>"


def _cards(samples: list[dict[str, Any]]) -> str:
    out = []
    for s in samples:
        if not isinstance(s, dict):
            continue
        parts = []
        if s.get("image"):
            parts.append(_img(s["image"], "gen" if s.get("generated") else ""))
        for key in ("prompt", "question", "text", "answer", "reference"):
            if s.get(key):
                parts.append(f"<div><b>{key}:</b> {html.escape(str(s[key]))}</div>")
        if "correct" in s:
            mark = "correct" if s["correct"] else "wrong"
            parts.append(f'<div class={"ok" if s["correct"] else "bad"}>{mark}</div>')
        out.append("<div class=card>" + "".join(parts) + "</div>")
    return "<div class=cards>" + "".join(out) + "</div>"


def _document(doc: dict[str, Any]) -> str:
    parts = []
    for seg in doc.get("segments", []):
        cls = "gen" if seg.get("generated") else ""
        if "image" in seg:
            parts.append(_img(seg["image"], cls))
        else:
            style = ' style="color:#15c"' if seg.get("generated") else ""
            parts.append(f"<span{style}>{html.escape(seg.get('text', ''))}</span>")
    return "<div class=doc>" + "".join(parts) + "</div>"


def write_report(run_dir: str | os.PathLike) -> Path:
    """Writes `<run_dir>/report.html`; returns its path. Missing parts are left out, not faked."""
    run = Path(run_dir)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    sections = [f"<h1>chameleon-jax run: {html.escape(run.name)}</h1>"]
    sections.append("<p>Generated parts are outlined or coloured blue.</p>")
    if metrics:
        top = {k: metrics[k] for k in HEADLINE if k in metrics}
        sections.append("<h2>Headline figures</h2>" + _metrics_table(top or metrics))
        if top:
            sections.append("<details><summary>All figures</summary>" + _metrics_table(metrics) + "</details>")

    curves = []
    for stage, keys in (("vq", ["loss", "recon_loss"]), ("lm", ["loss", "text_loss", "image_loss", "eval_loss"])):
        out = run / f"{stage}_loss.png"
        if (run / stage / "metrics.jsonl").exists() and plot_curves(run / stage, keys, out, f"{stage} training"):
            curves.append(_img(out.name, style="width:480px;height:auto"))
    if curves:
        sections.append("<h2>Loss curves</h2>" + "".join(curves))

    evals = run / "eval"
    titles = {
        "vq": "Image tokenizer: originals beside reconstructions",
        "caption": "Captioning: images with generated captions",
        "vqa": "Visual question answering",
        "t2i": "Text to image: prompts with generated images",
        "interleaved": "Interleaved generation",
    }
    for name, title in titles.items():
        path = evals / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        body = []
        if data.get("grid"):
            body.append(_img(data["grid"], style="max-width:100%;height:auto"))
        if data.get("samples"):
            body.append(_cards(data["samples"]))
        for doc in data.get("documents", []):
            body.append(_document(doc))
        if body:
            sections.append(f"<h2>{title}</h2>" + "".join(body))

    page = (
        "<!doctype html><html><head><meta charset=utf-8><title>chameleon-jax report</title>"
        f"<style>{_CSS}</style></head><body>" + "\n".join(sections) + "</body></html>\n"
    )
    out = run / "report.html"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(page)
    os.replace(tmp, out)
    return out


def main(argv: list[str]) -> None:
    usage = "usage: python -m eval.report run_dir=DIR  (writes DIR/report.html from DIR's figures; default runs/demo)"
    run_dir = "runs/demo"
    for a in argv:
        if a in ("-h", "--help", "help"):
            print(usage)
            return
        if a.startswith("run_dir="):
            run_dir = a.split("=", 1)[1]
        else:
            raise SystemExit(f"unknown argument {a!r}; {usage}")
    print(write_report(run_dir))


if __name__ == "__main__":
    main(sys.argv[1:])

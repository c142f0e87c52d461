"""The evaluations' command line: `--help`, and figures merged into the run's metrics.json."""

import json
import sys

import pytest

from eval import common


def test_help_lists_the_fields_and_exits_zero(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["eval.caption", "--help"])
    with pytest.raises(SystemExit) as stop:
        common.cli("caption", lambda pipe, cfg: {}, num_examples=200)
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "num_examples" in out and "200" in out and "image_decoding" in out


def test_a_run_writes_its_json_and_updates_metrics_json(tmp_path, monkeypatch):
    (tmp_path / "metrics.json").write_text(json.dumps({"caption_exact_match": 0.1, "vqa_accuracy": 0.7}))
    monkeypatch.setattr(common, "load_run_pipeline", lambda cfg: "pipe")
    monkeypatch.setattr(sys, "argv", ["eval.caption", f"run_dir={tmp_path}", "num_examples=3"])
    seen = {}

    def evaluate(pipe, cfg):
        seen.update(pipe=pipe, n=cfg.num_examples)
        return {"caption_exact_match": 0.5, "cider_d": 1.25, "samples": [], "greedy": True}

    common.cli("caption", evaluate)
    assert seen == {"pipe": "pipe", "n": 3}
    assert json.loads((tmp_path / "eval" / "caption.json").read_text())["cider_d"] == 1.25
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == {"caption_exact_match": 0.5, "caption_cider_d": 1.25, "vqa_accuracy": 0.7}


def test_report_help(capsys):
    from eval import report

    report.main(["--help"])
    assert "run_dir=DIR" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown argument"):
        report.main(["rundir=x"])


def test_data_seed_draws_other_pictures_of_the_same_split():
    from chameleon_jax.data import shapes

    def first(split, data_seed):
        cfg = common.EvalConfig(image_size=32, num_examples=4, data_seed=data_seed, shapes_backend="generate")
        return common.load_examples(cfg, split)

    base, other = first("heldout", 0), first("heldout", 1)
    assert [shapes.example_objects(e) for e in base] == [
        shapes.example_objects(e) for e in shapes.load("heldout", 32, backend="generate").examples(0, 4)]
    assert [shapes.example_objects(e) for e in base] != [shapes.example_objects(e) for e in other]
    # Another seed keeps the split's rule: every held-out picture shows a held-out pair.
    assert all(any(o.is_heldout for o in shapes.example_objects(e)) for e in other)

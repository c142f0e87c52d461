"""Batch inference over a JSONL prompts file: order, error records, resume after an interruption."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from chameleon_jax import batch_generate
from tests.test_pipeline_load import model_dir  # noqa: F401  (the shared tiny model directory)


@pytest.fixture
def prompts(tmp_path):
    Image.fromarray(np.full([16, 16, 3], 90, np.uint8)).save(tmp_path / "in.png")
    lines = [
        json.dumps({"segments": [{"text": "a red circle"}], "modality": "text", "max_new_tokens": 5}),
        json.dumps({"segments": [{"text": "draw"}, {"image": "in.png"}], "modality": "image", "seed": 3}),
        '{"segments": [{"text": "broken"}',  # malformed JSON
        "",  # blank lines are skipped
        json.dumps({"segments": [{"image": "missing.png"}]}),
        json.dumps({"segments": [{"text": "two blue squares " * 20}], "modality": "text"}),  # longer than the context
        json.dumps({"segments": [{"text": "the green triangle"}], "modality": "text", "max_new_tokens": 5}),
        json.dumps({"segments": [{"text": "two"}], "modality": "image"}),
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def records(out):
    return [json.loads(line) for line in (out / batch_generate.OUTPUTS).read_text().splitlines()]


def run(pipe, prompts, out, **kw):
    return batch_generate.run(pipe, prompts, out, batch_size=2, modality="any", max_new_tokens=0, seed=0,
                              progress=False, **kw)


def test_interrupted_run_resumes_and_writes_every_line_once(model_dir, prompts, tmp_path):  # noqa: F811
    from chameleon_jax.pipeline import load_pipeline

    pipe = load_pipeline(model_dir)
    whole = tmp_path / "whole"
    stats = run(pipe, prompts, whole)
    assert stats == {**stats, "lines": 7, "generated": 4, "errors": 3, "skipped": 0}
    expected = records(whole)
    assert [r["line"] for r in expected] == [1, 2, 3, 5, 6, 7, 8]
    errors = {r["line"]: r["error"] for r in expected if "error" in r}
    assert "prompts.jsonl:3: invalid JSON" in errors[3]
    assert "missing.png" in errors[5] and "not found" in errors[5]
    assert errors[6].startswith("line 6: the prompt has") and "context" in errors[6]
    image_lines = [r for r in expected if r["line"] in (2, 8)]
    for r in image_lines:
        [seg] = r["segments"]
        assert (whole / seg["image"]).is_file() and Image.open(whole / seg["image"]).size == (16, 16)
    assert all(r["new_tokens"] <= 5 for r in expected if r["line"] in (1, 7))

    # Interrupt a second run after its first batch, with a torn line at the end of the file.
    out = tmp_path / "resumed"
    calls = {"n": 0}
    generate_ids = pipe.generate_ids

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return generate_ids(*args, **kwargs)

    pipe.generate_ids = failing
    with pytest.raises(KeyboardInterrupt):
        run(pipe, prompts, out)
    first = records(out)
    assert 0 < len([r for r in first if "segments" in r]) < 4
    with open(out / batch_generate.OUTPUTS, "a") as f:
        f.write('{"line": 99, "segm')
    pipe.generate_ids = generate_ids
    stats = run(pipe, prompts, out)
    assert stats["skipped"] == len(first) and stats["generated"] + stats["errors"] == 7 - len(first)
    resumed = records(out)
    assert [r["line"] for r in resumed] == [1, 2, 3, 5, 6, 7, 8]  # each line once, in file order
    assert resumed == expected  # a line's output does not depend on its batch or on the interruption
    assert run(pipe, prompts, out)["generated"] == 0


def test_generate_cli_runs_a_prompts_file(model_dir, prompts, tmp_path, capsys):  # noqa: F811
    from chameleon_jax.generate import main

    main([f"path={model_dir}", f"prompts={prompts}", f"out={tmp_path / 'cli'}", "batch_size=4", "progress=false",
          "mesh.data=2"])
    assert [r["line"] for r in records(tmp_path / "cli")] == [1, 2, 3, 5, 6, 7, 8]
    assert "4 generated, 0 already done, 3 error record(s)" in capsys.readouterr().out

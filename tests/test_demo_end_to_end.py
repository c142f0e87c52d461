"""The whole pipeline on tiny presets: data, tokenizer, vocabulary, transformer, every evaluation, report."""

import dataclasses
import json

import pytest

from chameleon_jax import configlib

HEADLINE = [
    "caption_exact_match", "vqa_accuracy", "t2i_judge_accuracy_seen", "t2i_judge_accuracy_heldout",
    "vq_psnr_db", "vq_codebook_usage", "vq_judge_accuracy", "judge_accuracy_ground_truth",
]


def test_one_shapes_build_covers_every_stage():
    from eval import demo

    cfg = demo.PRESETS["demo"]()
    n = cfg.lm.data.train_examples
    # The demo's transformer trains on more pictures than the default build holds: the data
    # stage builds that bigger build, and the tokenizer reads its first 20000 pictures.
    assert demo.shapes_sizes(cfg) == {"train": n} and n > 20000
    small = configlib.apply_overrides(cfg, ["lm.data.train_examples=512"])
    assert demo.shapes_sizes(small) is None  # read from the default build
    assert demo.shapes_sizes(demo.PRESETS["tiny"]()) is None


def test_the_schedule_is_long_on_an_accelerator_and_as_given_on_a_cpu():
    from eval import demo

    cfg = demo.PRESETS["demo"]()
    same, name = demo.with_schedule(cfg, "cpu")
    assert name == "cpu" and same.lm == cfg.lm
    for backend in ("gpu", "tpu"):
        long, name = demo.with_schedule(cfg, backend)
        assert name == "long" and long.schedule == "long"
        assert long.lm.steps == 4 * cfg.lm.steps
        assert long.lm.eval_interval == 4 * cfg.lm.eval_interval
        assert long.lm.checkpoint_interval == 4 * cfg.lm.checkpoint_interval
        assert long.lm.optim == cfg.lm.optim and long.vq == cfg.vq
    # An explicit schedule wins over the backend.
    pinned = configlib.apply_overrides(cfg, ["schedule=cpu"])
    assert demo.with_schedule(pinned, "gpu")[0].lm == cfg.lm
    twice = configlib.apply_overrides(cfg, ["schedule=long", "long_steps_factor=2"])
    assert demo.with_schedule(twice, "cpu")[0].lm.steps == 2 * cfg.lm.steps
    with pytest.raises(ValueError, match="long_steps_factor"):
        demo.with_schedule(configlib.apply_overrides(cfg, ["long_steps_factor=0"]), "gpu")


def test_the_demos_recipe_digit_rows_a_digits_only_head_and_more_caption_and_text_to_image_documents():
    from eval import demo

    cfg = demo.PRESETS["demo"]()
    assert cfg.lm.model.image_code_digits == (-1,)  # train.lm reads the tokenizer's FSQ levels
    assert cfg.lm.model.image_code_own_logits is False
    assert cfg.vq.model.quantizer == "fsq" and len(cfg.vq.model.fsq_levels) > 1
    data = cfg.lm.data
    assert data.t2i_weight == 2 * data.vqa_weight and data.caption_weight == 1.5 * data.vqa_weight


@pytest.mark.parametrize("preset", ["demo", "tiny"])
def test_the_demo_codes_straddle_the_layout_cells(preset):
    """No code is a whole cell: the code grid is finer than the 3x3 layout and its lines do not
    fall on the cells' edges, so objects straddle codes and neighbours share them (the
    one-code-per-cell regime, 24 px with `shapes24`, is an explicit option, not the default)."""
    from chameleon_jax.data.shapes import spec
    from eval import demo

    cfg = demo.PRESETS[preset]()
    model = dataclasses.replace(cfg.vq.model, image_size=cfg.image_size)  # as the demo builds it
    side = model.grid[0]
    assert model.grid[0] == model.grid[1] and side > 3, model.grid
    code_edges = {i * cfg.image_size / side for i in range(1, side)}
    cell_edges = {i * cfg.image_size / 3 for i in range(1, 3)}
    assert not cell_edges <= code_edges, (code_edges, cell_edges)
    # The middle cell's objects, small or large, cross a code edge.
    centre = spec.layout(cfg.image_size).centers[1]
    for extent in spec.layout(cfg.image_size).extents:
        lo, hi = centre - extent / 2, centre + extent / 2
        assert any(lo < e < hi for e in code_edges), (extent, code_edges)


@pytest.mark.slow
def test_tiny_demo_runs_end_to_end_and_reuses_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHAMELEON_JAX_DATA", str(tmp_path / "data"))
    from eval import demo

    cfg = configlib.apply_overrides(demo.PRESETS["tiny"](), [f"run_dir={tmp_path / 'run'}"])
    run_dir = demo.run(cfg)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in HEADLINE:
        assert key in metrics, key
        if key != "vq_psnr_db":
            assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert metrics["judge_accuracy_ground_truth"] >= 0.995
    for name in ("caption_exact_match", "vqa_accuracy", "t2i_judge_accuracy_seen"):
        split = [k for k in metrics if k.startswith(name + "_") and k.endswith("_objects")]
        assert split and all(0.0 <= metrics[k] <= 1.0 for k in split), (name, split)
    assert metrics["vq_psnr_db"] > 5.0
    # The demo's image_size reaches the tokenizer and the LM data.
    assert metrics["vq_codes_per_image"] == 16
    assert 0.0 <= metrics["vq_judge_accuracy_heldout"] <= 1.0
    assert json.loads((run_dir / "vq" / "config.json").read_text())["model"]["image_size"] == 32
    assert json.loads((run_dir / "lm" / "config.json").read_text())["data"]["image_size"] == 32
    page = (run_dir / "report.html").read_text()
    for section in ("Headline figures", "Captioning", "Text to image", "Interleaved", "Loss curves"):
        assert section in page, section
    assert (run_dir / "lm" / "model" / "config.json").exists()
    assert (run_dir / "eval" / "t2i.json").exists()
    # Every stage drew its Shapes examples on access (shapes_backend=generate): nothing was built.
    assert not list((tmp_path / "data").glob("chameleon_shapes*")), sorted((tmp_path / "data").iterdir())

    # A second run reuses every finished stage and reproduces the figures.
    capsys.readouterr()
    demo.run(cfg)
    out = capsys.readouterr().out
    assert out.count("reusing the finished stage") >= 6
    again = json.loads((run_dir / "metrics.json").read_text())
    assert {k: again[k] for k in HEADLINE} == {k: metrics[k] for k in HEADLINE}

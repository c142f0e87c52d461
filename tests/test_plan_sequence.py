"""The memory planner with the attention kernel each chip runs and with the `sequence` (context-parallel) axis."""

from __future__ import annotations

import pytest

from chameleon_jax import configlib
from chameleon_jax.config import MODEL_PRESETS
from eval.bench import plan


def test_splash_on_tpu_drops_the_score_matrix_and_says_so():
    cfg = MODEL_PRESETS["chameleon-7b"]()
    splash = plan.make_plan(cfg, plan.parse_mesh("fsdp=8"), batch=8, seq=4096, accelerator="v5p")
    xla = plan.make_plan(configlib.apply_overrides(cfg, ["attention_impl=xla"]), plan.parse_mesh("fsdp=8"),
                         batch=8, seq=4096, accelerator="v5p")
    assert splash["activations"]["attention_kernel"] == "splash"
    assert xla["activations"]["attention_kernel"] == "xla"
    saved = plan.block_tensors(cfg, 8, 4096, plan.abstract_mesh(splash["mesh"]), plan.MeshConfig().rules,
                               "splash")
    assert saved["attn_logits"].bytes == saved["attn_probs"].bytes == 0
    assert saved["attn_softmax_stats"].bytes == 8 // 8 * cfg.num_heads * 4096 * 4  # [B, N, T] f32 per device
    # Under save_dots the attention half is rebuilt in the backward pass: XLA's [B,N,T,T] scores are
    # the larger half there, splash's are not.
    assert splash["activations"]["recompute_bytes"] < xla["activations"]["recompute_bytes"]
    assert "attention=splash" in plan.render(splash, "chameleon-7b", brief=True)


def test_sequence_axis_splits_activations_per_device():
    cfg = configlib.apply_overrides(MODEL_PRESETS["chameleon-7b"](), ["max_seq_len=32768"])
    one = plan.make_plan(cfg, plan.parse_mesh("fsdp=16"), batch=16, seq=8192, accelerator="v5p")
    ring = plan.make_plan(cfg, plan.parse_mesh("fsdp=16,sequence=4"), batch=16, seq=32768, accelerator="v5p")
    assert ring["activations"]["attention_kernel"] == "ring" and ring["tokens_per_row_per_device"] == 8192
    # Four times the tokens on four times the devices: the per-device activations other than
    # attention's own (k/v blocks met around the ring) are those of one 8192-token row.
    a, b = one["activations"]["saved_tensors"], ring["activations"]["saved_tensors"]
    for name in ("x", "q_raw", "gate", "up"):
        assert b[name]["bytes"] == a[name]["bytes"], name
    assert ring["activations"]["head_bytes"] == one["activations"]["head_bytes"]
    assert "tokens of each (context parallel, ring attention)" in plan.render(ring, "chameleon-7b", brief=True)
    with pytest.raises(configlib.ConfigError, match="does not split over sequence"):
        plan.make_plan(cfg, plan.parse_mesh("fsdp=2,sequence=3"), batch=2, seq=4096)


@pytest.mark.slow
def test_ring_estimate_agrees_with_the_compilers_memory_analysis():
    """The data=2 x sequence=4 train step on 8 CPU devices, within the tolerance tests/test_plan.py pins."""
    cfg = configlib.apply_overrides(MODEL_PRESETS["small"](), ["scan_layers=true", "remat_policy=save_dots"])
    mesh_cfg = plan.parse_mesh("data=2,sequence=4")
    p = plan.make_plan(cfg, mesh_cfg, batch=16, seq=256, backend="cpu")
    assert p["activations"]["attention_kernel"] == "ring"
    ratio = plan.compare(p, plan.compiled_memory(cfg, mesh_cfg, batch=16, seq=256))
    assert ratio["state_estimate_over_xla"] == pytest.approx(1.0, abs=0.01)
    assert 0.8 <= ratio["transient_estimate_over_xla_temp"] <= 1.25, ratio

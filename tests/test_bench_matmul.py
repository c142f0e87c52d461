"""The matmul benchmark: one row of positive figures per product; the benchmarks' clear errors for bad values."""

import json

import pytest

from chameleon_jax import configlib
from eval.bench import matmul


def test_every_product_gets_a_figure_per_dtype_and_the_json_matches(tmp_path, capsys):
    out = tmp_path / "mm.json"
    matmul.main(["shapes=64x32x48,16x16x16", "repeats=2", f"out={out}"])
    rows = json.loads(out.read_text())
    assert [r["shape"] for r in rows] == [[64, 32, 48], [16, 16, 16]]
    for r in rows:
        assert all(r[name] > 0 for name, _, _ in matmul.KINDS)
        assert r["bf16_f32_speedup"] == pytest.approx(r["bf16->f32"] / r["f32"])
    assert "64 x 32 x 48" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["64x32", "64x0x8", "axbxc", ""])
def test_bad_shapes_name_the_item(text):
    with pytest.raises(configlib.ConfigError, match="shapes"):
        matmul.parse_shapes(text)


def test_benchmark_command_lines_stop_with_a_config_error_on_bad_values(capsys):
    from eval.bench import data

    for main, arg in ((matmul.main, "shapes=1x2"), (data.main, "sizes=ten")):
        with pytest.raises(SystemExit) as stop:
            main([arg])
        assert stop.value.code == 2
        assert arg.split("=")[0] in capsys.readouterr().err

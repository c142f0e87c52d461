"""Defaults that follow Meta's reference code: QK-norm off unless params.json turns it on;
the 34B preset keeps one QK-norm per head, as its model-parallel ranks did."""

from __future__ import annotations

import pytest

from chameleon_jax.config import MODEL_PRESETS
from chameleon_jax.convert.meta import config_from_meta

PARAMS = {"dim": 64, "n_heads": 4, "n_layers": 2}


def _qk_norm(params):
    return config_from_meta(params, vocab_size=128, qk_norm="shared", param_dtype="float32", dtype=None,
                            scan_layers=False).qk_norm


def test_meta_params_without_qk_normalization_import_without_qk_norm():
    assert _qk_norm(PARAMS) == "none"


@pytest.mark.parametrize("flag,expected", [(True, "shared"), (False, "none")])
def test_meta_params_qk_normalization_flag_is_followed(flag, expected):
    assert _qk_norm({**PARAMS, "qk_normalization": flag}) == expected


def test_34b_preset_keeps_one_qk_norm_per_head():
    assert MODEL_PRESETS["chameleon-34b"]().qk_norm == "per_head"
    assert MODEL_PRESETS["chameleon-7b"]().qk_norm == "shared"

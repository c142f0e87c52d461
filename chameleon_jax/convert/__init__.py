"""Import released Chameleon weights into a model directory, and export ours to Hugging Face.

    python -m chameleon_jax.convert hf   SRC DST   # Hugging Face ChameleonForConditionalGeneration
    python -m chameleon_jax.convert meta SRC DST   # Meta's release: consolidated*.pth + params.json
    python -m chameleon_jax.convert export-hf SRC DST   # ours -> Hugging Face (see export_hf)

Both write DST/config.json and DST/params/ (see `chameleon_jax.checkpoint`) and copy the
checkpoint's text tokenizer to DST/chameleon_tokenizer.json, from which the vocabulary
is built. Tensors are read and converted one at a time; the only full copy of the model
in host memory is the one being written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from chameleon_jax import configlib
from chameleon_jax.checkpoint import CONFIG_FILE, PARAMS_DIR, abstract_params, save_params
from chameleon_jax.config import ModelConfig

TOKENIZER_FILE = "chameleon_tokenizer.json"


class ConversionError(ValueError):
    """The source checkpoint lacks tensors, or holds tensors of the wrong shape."""


def numpy_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}[name]


class ParamWriter:
    """Collects converted tensors into the parameter tree of `Transformer(cfg)`.

    Top-level tensors are addressed by key path (("embed", "embedding_vd")), block
    tensors by layer and block-relative key path (3, ("attn", "wq_dnh")). With
    cfg.scan_layers, block tensors go into preallocated [layers, ...] arrays, so
    stacking never copies. Problems are collected and raised together by `finish`.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.dtype = numpy_dtype(cfg.param_dtype)
        tree = abstract_params(cfg)
        blocks = tree.pop("blocks")
        self._top = {k: tuple(v.shape) for k, v in _flatten(tree)}
        if cfg.scan_layers:
            self._layer = {k: tuple(v.shape[1:]) for k, v in _flatten(blocks)}
        else:
            self._layer = {k: tuple(v.shape) for k, v in _flatten(blocks[0])}
        self._values: dict[tuple, np.ndarray] = {}
        self._stacked: dict[tuple, np.ndarray] = {}
        self._filled: set[tuple] = set()
        self.problems: list[str] = []

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def put(self, key: Sequence[str], value: np.ndarray, source: str) -> None:
        key = tuple(key)
        if key not in self._top:
            raise KeyError(f"the model has no parameter {'.'.join(key)}")
        if self._check(key, self._top[key], value, source):
            self._values[key] = np.ascontiguousarray(value, dtype=self.dtype)
            self._filled.add(key)

    def put_layer(self, layer: int, key: Sequence[str], value: np.ndarray, source: str) -> None:
        key = tuple(key)
        if key not in self._layer:
            raise KeyError(f"a block has no parameter {'.'.join(key)}")
        if not self._check(("blocks", str(layer)) + key, self._layer[key], value, source):
            return
        if self.cfg.scan_layers:
            if key not in self._stacked:
                self._stacked[key] = np.empty((self.cfg.num_layers,) + self._layer[key], self.dtype)
            self._stacked[key][layer] = value
        else:
            self._values[(layer,) + key] = np.ascontiguousarray(value, dtype=self.dtype)
        self._filled.add((layer,) + key)

    def _check(self, key, expected, value, source) -> bool:
        if tuple(value.shape) != tuple(expected):
            self.problems.append(
                f"{source}: converted shape {tuple(value.shape)} does not fit {'.'.join(map(str, key))} "
                f"(expected {tuple(expected)})"
            )
            return False
        return True

    def finish(self) -> dict:
        missing = [".".join(k) for k in self._top if k not in self._filled]
        for layer in range(self.cfg.num_layers):
            missing += [f"blocks.{layer}." + ".".join(k) for k in self._layer if (layer,) + k not in self._filled]
        if self.problems or missing:
            lines = list(self.problems)
            if missing and not self.problems:
                lines += [f"no value for parameter {m}" for m in missing]
            raise ConversionError("cannot convert the checkpoint:\n  " + "\n  ".join(lines))
        tree: dict = {}
        for key, value in self._values.items():
            if isinstance(key[0], int):
                key = ("blocks",) + key
            _set(tree, key, value)
        for key, value in self._stacked.items():
            _set(tree, ("blocks",) + key, value)
        return tree


def _flatten(tree, prefix=()) -> Iterable[tuple[tuple, object]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, key: tuple, value) -> None:
    for k in key[:-1]:
        tree = tree.setdefault(k, {})
    tree[key[-1]] = value


def write_model_dir(dst: str | os.PathLike, cfg: ModelConfig, params: dict) -> Path:
    dst = Path(dst).absolute()
    dst.mkdir(parents=True, exist_ok=True)
    save_params(dst / PARAMS_DIR, params)
    configlib.save(cfg, dst / CONFIG_FILE)
    return dst


def copy_tokenizer(candidates: Sequence[Path], dst: Path) -> Path | None:
    """Copies the first existing tokenizer file to DST/chameleon_tokenizer.json."""
    for path in candidates:
        if path is not None and Path(path).is_file():
            target = Path(dst) / TOKENIZER_FILE
            shutil.copyfile(path, target)
            return target
    return None

"""Where built data sets live."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "CHAMELEON_JAX_DATA"


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory: `explicit` if given (an empty string counts as not given), else
    $CHAMELEON_JAX_DATA, else `<repo>/data`.

    `<repo>` is the checkout holding this package (the folder with pyproject.toml);
    for an installed, non-editable package it falls back to ~/.cache/chameleon_jax/data.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / "data"
    return Path.home() / ".cache" / "chameleon_jax" / "data"

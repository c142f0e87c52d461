"""Run logging: metrics to JSON Lines and TensorBoard events, headline figures to metrics.json."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping


def _plain(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if isinstance(v, int) else f


class MetricsWriter:
    """Appends `{"step": s, **metrics}` lines to `run_dir/metrics.jsonl` and TensorBoard events.

    TensorBoard events go to `run_dir/tb/`; a missing tensorboardX only disables them.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                self._tb = None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of `run_dir/metrics.jsonl` (empty if absent)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def update_headline(path: str | os.PathLike, figures: Mapping[str, Any]) -> dict[str, Any]:
    """Merges flat `figures` into the JSON object at `path` (written atomically); returns the result."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update({k: _plain(v) for k, v in figures.items()})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return data


def plot_curves(run_dir: str | os.PathLike, keys: list[str], out_png: str | os.PathLike, title: str = "") -> bool:
    """Plots the named metrics against step into a PNG; returns False when none of them was logged."""
    rows = read_metrics(run_dir)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    drawn = False
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if pts:
            ax.plot(*zip(*pts), label=k)
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(out_png)
    plt.close(fig)
    return drawn

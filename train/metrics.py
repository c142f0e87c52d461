"""Run logging: metrics to JSON Lines and TensorBoard events, headline figures to metrics.json."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("train.run")

METRICS_FILE = "metrics.jsonl"


def _plain(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if isinstance(v, int) else f


class MetricsWriter:
    """Appends `{"step": s, **metrics}` lines to `run_dir/metrics.jsonl` and TensorBoard events.

    Each row goes to the file in one `write` of the whole line, so a killed process leaves
    at most one torn last line, never half of an earlier one. `resume_step`: the step the
    run continues from (0 for a fresh start); rows of later steps, logged by a run that
    was stopped before it could checkpoint them, are dropped first (see `truncate_metrics`)
    so every step appears once. TensorBoard events go to `run_dir/tb/` (their later steps
    are purged the same way); a missing tensorboardX only disables them.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_metrics(self.run_dir, resume_step)
        self._fd = os.open(self.run_dir / METRICS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                purge = resume_step + 1 if resume_step is not None else None
                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)
            except ImportError:
                self._tb = None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        data = (json.dumps(row) + "\n").encode()
        while data:
            data = data[os.write(self._fd, data):]
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _parse_rows(text: str) -> tuple[list[tuple[str, dict]], int]:
    """(line, row) of every whole, readable line; and how many lines were torn or unreadable."""
    rows, bad = [], 0
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:  # no newline at the end: the writer was killed inside this line
        lines.pop()
        bad += 1
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append((line, row))
        else:
            bad += 1
    return rows, bad


def truncate_metrics(run_dir: str | os.PathLike, last_step: int) -> None:
    """Keeps the rows of steps <= `last_step` of `run_dir/metrics.jsonl`; torn or unreadable lines go too.

    Rewritten atomically (a new file, then a rename): a kill here leaves the old or the new file.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    rows, bad = _parse_rows(path.read_text(errors="replace"))
    kept = [line for line, row in rows if row.get("step", 0) <= last_step]
    if bad:
        log.warning("%s: cut %d torn or unreadable line(s)", path, bad)
    if bad or len(kept) != len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All whole rows of `run_dir/metrics.jsonl` (empty if absent; a torn last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [row for _, row in _parse_rows(path.read_text(errors="replace"))[0]]


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

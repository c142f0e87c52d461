"""Batch inference over a JSONL file of prompts: `python -m chameleon_jax.generate prompts=FILE.jsonl out=DIR`.

Each line is a document in the JSONL user format (`chameleon_jax.data.jsonl`:
`{"segments": [{"text": ...}, {"image": "path.png"}, ...]}`, images relative to the
file) and may also say `"modality"`, `"max_new_tokens"` and `"seed"`. DIR gets

    outputs.jsonl    one line per prompt line, in file order:
                     {"line": N, "segments": [{"text": ...}, {"image": "images/N_k.png"}], "new_tokens": T}
                     or, for a line that cannot run, {"line": N, "error": "what is wrong"}
    images/          the generated pictures as PNG

Prompts are batched by (modality, max_new_tokens, padded prompt length), so a batch
compiles once per length bucket and wastes little padding. A line's output depends
only on the line (its prompt, settings and seed; default seed: the run's `seed` plus
the line's index), never on which other lines share its batch.

Resumable: each record is appended as one write of a whole line once its PNGs are on
disk, so a killed run leaves only complete lines (a torn last line, should the
machine die mid-write, is cut off on restart); a restarted command skips the lines
already written. When every line is done the file is rewritten in line order (a
temporary file renamed over it). Bad lines (malformed JSON, a missing image, a prompt
too long for the context) become error records; the other lines still run.

Several processes (`jax.distributed`): every process reads the file and encodes each
batch's prompts, feeds its share of the batch to the global decode, and process 0
writes the results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

OUTPUTS = "outputs.jsonl"
IMAGES = "images"
LINE_KEYS = ("modality", "max_new_tokens", "seed")


@dataclasses.dataclass
class Job:
    """One prompt line, parsed (or the error that stops it)."""

    line: int  # 1-based line number in the prompts file
    index: int  # 0-based index among the file's non-blank lines
    segments: list | None = None
    modality: str = "any"
    max_new_tokens: int = 0
    seed: int = 0
    ids: list[int] | None = None
    error: str | None = None


def parse_jobs(path: Path, *, modality: str, max_new_tokens: int, seed: int) -> list[Job]:
    """Every non-blank line of the prompts file as a Job; a line that cannot be read carries its error."""
    from chameleon_jax.data.documents import DataError
    from chameleon_jax.data.jsonl import parse_line

    base = path.resolve().parent
    jobs: list[Job] = []
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            job = Job(line=lineno, index=len(jobs), modality=modality, max_new_tokens=max_new_tokens,
                      seed=seed + len(jobs))
            jobs.append(job)
            where = f"{path.name}:{lineno}"
            try:
                raw = json.loads(text)
                if isinstance(raw, dict):
                    settings = {k: raw.pop(k) for k in LINE_KEYS if k in raw}
                    job.modality = settings.get("modality", modality)
                    if job.modality not in ("text", "image", "any"):
                        raise DataError(f"{where}: modality must be text, image or any, got {job.modality!r}")
                    for key in ("max_new_tokens", "seed"):
                        if key not in settings:
                            continue
                        value = settings[key]
                        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key[0] == "m" else 0):
                            raise DataError(f"{where}: {key} must be a{' positive' if key[0] == 'm' else ' non-negative'}"
                                            f" integer, got {value!r}")
                        setattr(job, key, value)
                    text = json.dumps(raw)
                doc = parse_line(text, where, base)
            except json.JSONDecodeError as e:
                job.error = f"{where}: invalid JSON: {e.msg} at column {e.colno}"
                continue
            except DataError as e:
                job.error = str(e)
                continue
            job.segments = [s.text if s.text is not None else s.image for s in doc.segments]
    return jobs


# --------------------------------------------------------------------------- the output file


def read_done(out_dir: Path) -> set[int]:
    """Lines already in DIR/outputs.jsonl; a torn last line (no newline) is cut off the file."""
    path = out_dir / OUTPUTS
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    return {json.loads(line)["line"] for line in data.splitlines() if line.strip()}


def append_records(out_dir: Path, records: Sequence[dict]) -> None:
    """Appends whole lines with one write, then syncs: a kill leaves no partial record."""
    if not records:
        return
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    fd = os.open(out_dir / OUTPUTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)


def sort_outputs(out_dir: Path) -> None:
    """Rewrites outputs.jsonl in line order (temporary file, then rename)."""
    path = out_dir / OUTPUTS
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sorted(records, key=lambda r: r["line"])))
    os.replace(tmp, path)


def save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


def output_record(job: Job, segments: list, out_dir: Path, new_tokens: int) -> dict[str, Any]:
    from chameleon_jax.pipeline import ImageCodes

    out = []
    for k, seg in enumerate(segments):
        if isinstance(seg, str):
            out.append({"text": seg})
        elif isinstance(seg, ImageCodes):
            out.append({"image_codes": seg.codes.tolist()})
        else:
            rel = f"{IMAGES}/{job.line:06d}_{k}.png"
            save_png(seg, out_dir / rel)
            out.append({"image": rel})
    return {"line": job.line, "segments": out, "new_tokens": new_tokens}


# --------------------------------------------------------------------------- batching


def batches(jobs: Sequence[Job], batch_size: int) -> Iterator[list[Job]]:
    """Jobs grouped by (modality, max_new_tokens, padded prompt length), in file order within a group,
    groups in the order of their first line; each group cut into batches of at most batch_size."""
    from chameleon_jax.generation.decode import prompt_bucket

    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.modality, job.max_new_tokens, prompt_bucket(len(job.ids))), []).append(job)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


def encode(pipe, job: Job) -> None:
    """Sets job.ids, or job.error when the prompt cannot be encoded or does not fit the context."""
    from chameleon_jax.generation.decode import plan_lengths

    try:
        job.ids = pipe.encode_prompt(job.segments)
        plan_lengths([len(job.ids)], max_new_tokens=job.max_new_tokens, context=pipe.context_length,
                     modality=job.modality, codes_per_image=pipe.codes_per_image)
    except ValueError as e:
        job.error = f"line {job.line}: {str(e).replace('prompt 0 ', 'the prompt ')}"
        job.ids = None


def process_share(items: Sequence[Any]) -> list[Any]:
    """This process's contiguous share of a batch (all of it in a one-process run)."""
    import jax

    n, p = jax.process_count(), jax.process_index()
    per = -(-len(items) // n)
    return list(items[p * per : (p + 1) * per])


def run(pipe, prompts_path: str | os.PathLike, out_dir: str | os.PathLike, *, batch_size: int, modality: str,
        max_new_tokens: int, seed: int, progress: bool = True, **sampling) -> dict[str, Any]:
    """Generates every not-yet-written line of the prompts file; returns counts and speeds.

    sampling: the `Pipeline.generate_ids` keywords shared by every line (temperature, guidance, ...).
    """
    from tqdm import tqdm

    from chameleon_jax.generation import placement
    from chameleon_jax.generation.distributed import is_primary
    from chameleon_jax.pipeline import default_max_new_tokens

    prompts_path, out_dir = Path(prompts_path), Path(out_dir)
    if not prompts_path.is_file():
        raise FileNotFoundError(f"prompts file {prompts_path} does not exist")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    primary = is_primary()
    if primary:
        (out_dir / IMAGES).mkdir(parents=True, exist_ok=True)
    done = read_done(out_dir) if primary else set()
    done = set(placement.gather_token_lists([sorted(done)] if primary else [])[0]) if _several() else done
    jobs = parse_jobs(prompts_path, modality=modality, max_new_tokens=max_new_tokens, seed=seed)
    todo = [j for j in jobs if j.line not in done]
    for job in todo:
        if job.error is None:
            job.max_new_tokens = job.max_new_tokens or default_max_new_tokens(job.modality, pipe.codes_per_image)
            encode(pipe, job)
    if primary:
        append_records(out_dir, [{"line": j.line, "error": j.error} for j in todo if j.error is not None])
    runnable = [j for j in todo if j.error is None]
    bar = tqdm(total=len(runnable), desc="generate", unit="prompt", disable=not (progress and primary))
    t0, new_tokens = time.perf_counter(), 0
    for batch in batches(runnable, batch_size):
        mine = process_share(batch)
        head = batch[0]
        result = pipe.generate_ids([j.ids for j in mine], modality=head.modality, max_new_tokens=head.max_new_tokens,
                                   stream_ids=[j.seed for j in mine], **sampling)
        tokens = placement.gather_token_lists(result.tokens)
        new_tokens += sum(len(t) for t in tokens)
        if primary:
            segments = pipe.segments_of_rows(tokens)
            append_records(out_dir, [output_record(j, s, out_dir, len(t)) for j, s, t in zip(batch, segments, tokens)])
        seconds = time.perf_counter() - t0
        bar.update(len(batch))
        bar.set_postfix_str(f"{bar.n / seconds:.2f} prompts/s, {new_tokens / seconds:.1f} tokens/s")
    bar.close()
    if primary and len(read_done(out_dir)) == len(jobs):
        sort_outputs(out_dir)
    seconds = time.perf_counter() - t0
    return {"lines": len(jobs), "skipped": len(jobs) - len(todo), "generated": len(runnable),
            "errors": sum(j.error is not None for j in todo), "new_tokens": new_tokens, "seconds": seconds}


def _several() -> bool:
    import jax

    return jax.process_count() > 1

"""One process of a multi-process CPU training run; tests/test_multiprocess.py starts it.

    python tests/multiprocess_worker.py --run-dir /tmp/mp --process-id 0 --num-processes 2 \
        --port 12345 --local-devices 4 --steps 3 --out /tmp/losses_0.json

Every process sees `--local-devices` fake CPU devices; with several processes they join
through `train.lm.maybe_initialize_distributed` (gloo collectives on CPU) and train the
`tiny` LM preset with the project's `Trainer` on one mesh spanning all of them.

Data: the run tokenises the tiny preset's Shapes documents into `--run-dir/tokens/`
(train.lm_inputs), or with `--tokenised` reads what an earlier run put there. The
document stream is split into `--data-shards` sub-streams exactly as
`ShardData.train_iterator(rows, shard, shards)` splits it between processes; a process
reads only the shards it owns, and the global batch is assembled from the processes'
rows with `lm_data.global_batch` (`jax.make_array_from_process_local_data`). One process
owning every shard therefore sees the same global batch as two processes owning one
each, so their losses must agree.

The losses, gradient norms and final parameter norm are written to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="tokenised documents and vocabulary (shared by all processes)")
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (several processes only)")
    p.add_argument("--local-devices", type=int, default=8, help="fake CPU devices in this process")
    p.add_argument("--mesh", default="data=2,fsdp=2,tensor=2", help="mesh sizes over all processes' devices")
    p.add_argument("--data-shards", type=int, default=2, help="sub-streams the documents are split into")
    p.add_argument("--tokenised", action="store_true",
                   help="read the documents an earlier run tokenised into --run-dir instead of tokenising them")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    p.add_argument("--seq", type=int, default=128, help="tokens per row")
    p.add_argument("--out", required=True, help="where to write the results as JSON")
    return p.parse_args(argv)


def _rows_of_this_process(sharding, shape) -> tuple[int, int]:
    """[start, stop) of the batch rows held by this process's devices."""
    starts, stops = [], []
    for idx in sharding.addressable_devices_indices_map(shape).values():
        starts.append(idx[0].start or 0)
        stops.append(shape[0] if idx[0].stop is None else idx[0].stop)
    return min(starts), max(stops)


def train(args) -> dict:
    import jax
    import numpy as np

    from chameleon_jax import configlib
    from chameleon_jax.data.grain_pipeline import ShardData
    from chameleon_jax.lm_data import global_batch
    from chameleon_jax.sharding import build_mesh
    from train import lm, lm_config

    overrides = [f"mesh.{item.strip()}" for item in args.mesh.split(",")] + [
        f"batch_size={args.batch}", f"steps={args.steps}", f"data.sequence.seq_len={args.seq}",
        "data.sequence.overlong=split", "optim.warmup_steps=1", "progress=false",
    ]
    if args.tokenised:
        overrides += ["data.source=shards", f"data.shards={os.path.join(args.run_dir, 'tokens', 'train')}"]
    if args.num_processes > 1:
        overrides += [f"coordinator_address=127.0.0.1:{args.port}", f"num_processes={args.num_processes}",
                      f"process_id={args.process_id}"]
    cfg = configlib.apply_overrides(lm_config.tiny(), overrides)
    lm.maybe_initialize_distributed(cfg)

    pidx, pcount = jax.process_index(), jax.process_count()
    assert pcount == args.num_processes and jax.local_device_count() == args.local_devices, (
        pcount, jax.local_device_count())
    from train.lm_inputs import prepare

    data = ShardData.build(prepare(cfg, Path(args.run_dir)), vq_dir="", is_primary=pidx == 0)
    cfg = lm.resolve_config(cfg, data.vocab, data.image_tokenizer.codes_per_image)
    mesh = build_mesh(cfg.mesh)
    trainer = lm.get_trainer(cfg, mesh)
    state = trainer.init_state()

    shards = args.data_shards
    if shards % pcount or args.batch % shards:
        raise SystemExit(f"{shards} data shards must split over {pcount} processes and divide the batch {args.batch}")
    mine = range(pidx * shards // pcount, (pidx + 1) * shards // pcount)
    iterators = [data.train_iterator(args.batch, s, shards) for s in mine]
    # Shard s's rows are global rows [s*B/S, (s+1)*B/S): this process's devices must hold its shards' rows.
    shape = (args.batch, data.seq_len)
    held = _rows_of_this_process(trainer.batch_sharding(shape), shape)
    wanted = (mine[0] * args.batch // shards, (mine[-1] + 1) * args.batch // shards)
    if held != wanted:
        raise SystemExit(f"process {pidx}'s devices hold batch rows {held}, its data shards are rows {wanted}")

    losses, grad_norms, param_norm = [], [], None
    for _ in range(args.steps):
        parts = [it.next_local() for it in iterators]
        local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        batch = global_batch(local, trainer.batch_sharding, args.batch)
        state, metrics = trainer.train_step(state, batch)
        m = jax.device_get(metrics)
        losses.append(float(m["loss"]))
        grad_norms.append(float(m["grad_norm"]))
        param_norm = float(m["param_norm"])
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "param_norm": param_norm,
        "rows": list(held),
        "process_index": pidx,
        "process_count": pcount,
        "global_devices": jax.device_count(),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
    }


def main(argv=None):
    args = _parse(argv)
    # The device count must be fixed before jax is imported.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    t0 = time.time()
    result = train(args)
    result["seconds"] = round(time.time() - t0, 2)
    with open(args.out, "w") as f:
        json.dump(result, f)
    if args.num_processes > 1:
        import jax

        jax.distributed.shutdown()


if __name__ == "__main__":
    main()

"""One process of a multi-process CPU training run; tests/test_multiprocess.py starts it.

    python tests/multiprocess_worker.py --process-id 0 --num-processes 2 --port 12345 \
        --local-devices 4 --steps 3 --out /tmp/losses_0.json

Every process sees `--local-devices` fake CPU devices; with several processes they
join through `jax.distributed.initialize` (gloo collectives on CPU) and train on a
mesh spanning all of them. Each process builds only its own rows of every global
batch. The losses (identical on every process) are written to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (several processes only)")
    p.add_argument("--local-devices", type=int, default=8, help="fake CPU devices in this process")
    p.add_argument("--mesh", default="data=2,fsdp=2,tensor=2", help="mesh sizes over all processes' devices")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    p.add_argument("--seq", type=int, default=32, help="tokens per row")
    p.add_argument("--out", required=True, help="where to write {'losses': [...]} as JSON")
    return p.parse_args(argv)


def _mesh_sizes(text: str) -> dict[str, int]:
    sizes = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        sizes[name.strip()] = int(value)
    return sizes


def _global_tokens(step: int, batch: int, seq: int, vocab: int):
    """The full global batch of one step; every process can compute any of its rows."""
    import numpy as np

    rows = [np.random.default_rng([step, r]).integers(0, vocab, size=seq + 1) for r in range(batch)]
    return np.stack(rows).astype(np.int32)


def _local_rows(sharding, global_shape) -> slice:
    """The contiguous block of batch rows held by this process's devices under `sharding`."""
    starts, stops = [], []
    for idx in sharding.addressable_devices_indices_map(global_shape).values():
        starts.append(idx[0].start or 0)
        stops.append(global_shape[0] if idx[0].stop is None else idx[0].stop)
    return slice(min(starts), max(stops))


def train(mesh_text: str, *, steps: int, batch: int, seq: int) -> list[float]:
    """A few AdamW steps of a small sharded LM; returns the loss of each step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    sizes = _mesh_sizes(mesh_text)
    names = ("data", "fsdp", "tensor")
    mesh = jax.make_mesh(tuple(sizes[n] for n in names), names, devices=jax.devices(),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    vocab, dim, hidden = 64, 32, 64
    specs = {"embed_vd": P("tensor", "fsdp"), "w_in_df": P("fsdp", "tensor"), "w_out_fd": P("tensor", "fsdp"),
             "unembed_dv": P("fsdp", "tensor")}
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}

    def init(key):
        k = jax.random.split(key, 4)
        return {
            "embed_vd": jax.random.normal(k[0], (vocab, dim)) * 0.02,
            "w_in_df": jax.random.normal(k[1], (dim, hidden)) * 0.02,
            "w_out_fd": jax.random.normal(k[2], (hidden, dim)) * 0.02,
            "unembed_dv": jax.random.normal(k[3], (dim, vocab)) * 0.02,
        }

    tx = optax.adamw(1e-2)
    params = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    opt_state = jax.jit(tx.init)(params)

    def loss_fn(p, tokens_bt):
        x_btd = p["embed_vd"][tokens_bt[:, :-1]]
        x_btd = x_btd + jax.nn.gelu(x_btd @ p["w_in_df"]) @ p["w_out_fd"]
        logits_btv = x_btd @ p["unembed_dv"]
        return optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt[:, 1:]).mean()

    @jax.jit
    def step(p, o, tokens_bt):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens_bt)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    shape = (batch, seq + 1)
    rows = _local_rows(batch_sharding, shape)
    losses = []
    for i in range(steps):
        local = _global_tokens(i, batch, seq, vocab)[rows]
        tokens = jax.make_array_from_process_local_data(batch_sharding, local, shape)
        params, opt_state, loss = step(params, opt_state, tokens)
        losses.append(float(np.asarray(jax.device_get(loss))))
    return losses


def main(argv=None):
    args = _parse(argv)
    # The device count must be fixed before jax is imported.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=120,
        )
    assert jax.process_count() == args.num_processes, jax.process_count()
    assert jax.local_device_count() == args.local_devices, jax.local_device_count()

    t0 = time.time()
    losses = train(args.mesh, steps=args.steps, batch=args.batch, seq=args.seq)
    result = {
        "losses": [float(x) for x in losses],
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "global_devices": jax.device_count(),
        "seconds": round(time.time() - t0, 2),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()

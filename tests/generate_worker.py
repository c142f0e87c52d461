"""One process of a multi-process generation run; tests/test_generation_multiprocess.py starts it.

    python tests/generate_worker.py --out /tmp/p0.json --process-id 0 --num-processes 2 --port 12345 --local-devices 4

Every process builds the same steered tiny model (tests/test_generation_mesh.py) on a
data=2, fsdp=2, tensor=2 mesh over all processes' devices, takes its contiguous share
of the PROMPTS (uneven: 3 and 2 of 5) and generates them; it writes its own outputs
and the outputs gathered from every process to `--out` as JSON. `generate_share` is the
same computation for a process that has already set up jax (the test's own one-process run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--local-devices", type=int, default=8)
    args = p.parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)

    from chameleon_jax.generation.distributed import DistributedConfig, maybe_initialize

    if args.num_processes > 1:
        maybe_initialize(DistributedConfig(coordinator_address=f"127.0.0.1:{args.port}",
                                           num_processes=args.num_processes, process_id=args.process_id))
    import jax

    result = generate_share()
    with open(args.out, "w") as f:
        json.dump(result, f)
    if args.num_processes > 1:
        jax.distributed.shutdown()


def generate_share() -> dict:
    """This process's share of the prompts generated on the mesh over every process's devices:
    {"process_count", "devices", "local": {call: rows}, "gathered": {call: all processes' rows}}."""
    import jax

    from chameleon_jax.config import MeshConfig
    from chameleon_jax.generation.placement import gather_token_lists
    from chameleon_jax.pipeline import Pipeline
    from tests.test_generation_fixtures import PatchTokenizer
    from tests.test_generation_mesh import PROMPTS, VOCAB, ids, run_calls, steered_model

    prompts = PROMPTS + [ids("two blue"), ids("x")]
    per = -(-len(prompts) // jax.process_count())
    mine = prompts[jax.process_index() * per : (jax.process_index() + 1) * per]
    pipe = Pipeline.from_parts(steered_model(), VOCAB, PatchTokenizer(), mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    local = run_calls(pipe, mine)
    return {
        "process_count": jax.process_count(), "devices": jax.device_count(), "local": local,
        "gathered": {k: gather_token_lists(v) for k, v in local.items()},
    }


if __name__ == "__main__":
    main()

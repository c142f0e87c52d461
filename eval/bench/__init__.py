"""Tools apart from the quality evaluations: the memory planner, benchmarks, the accelerator check,
the preemption soak test, and the synthetic inputs they share.

    python -m eval.bench.plan ...       memory per device of a train step or of generation
    python -m eval.bench.train ...      train-step throughput and MFU
    python -m eval.bench.decode ...     decode speed against Hugging Face
    python -m eval.bench.data ...       data-path memory and speed
    python -m eval.bench.packing ...    padding and batch time of the LM loader's packers
    python -m eval.bench.matmul ...     matmul GFLOP/s by dtype (is there a fast bf16 path?)
    python -m eval.bench.gpu_check      one-accelerator MFU and decode bandwidth
    python -m eval.bench.chaos ...      kill a training run at random moments; it must end as an uninterrupted one
"""


def json_main(argv, presets: dict, default: str, bench) -> None:
    """The command line of a benchmark: parse its config, run `bench(cfg)` (which prints the figures)
    and, when the config's `out` names a file, write what it returned there as JSON."""
    import json
    import sys
    from pathlib import Path

    from chameleon_jax import configlib

    argv = sys.argv[1:] if argv is None else argv

    def go():
        cfg = configlib.from_cli(argv, presets, default)
        result = bench(cfg)
        if cfg.out:
            Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")

    configlib.main_guard(go)

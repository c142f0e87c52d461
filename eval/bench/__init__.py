"""Tools apart from the quality evaluations: the memory planner, benchmarks, the accelerator check,
the preemption soak test, and the synthetic inputs they share.

    python -m eval.bench.plan ...       memory per device of a train step or of generation
    python -m eval.bench.train ...      train-step throughput and MFU
    python -m eval.bench.decode ...     decode speed against Hugging Face
    python -m eval.bench.data ...       data-path memory and speed
    python -m eval.bench.gpu_check      one-accelerator MFU and decode bandwidth
    python -m eval.bench.chaos ...      kill a training run at random moments; it must end as an uninterrupted one
"""

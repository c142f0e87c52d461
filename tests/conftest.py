"""Every test process sees 8 fake CPU devices, so sharding tests can build real meshes.

This must run before jax is imported anywhere in the process.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()


def pytest_collection_modifyitems(config, items):
    """Files holding a `slow` test run first, so that under `-n 2 --dist loadfile --no-loadscope-reorder`
    (tests/run.sh) the longest files start at once and the short ones fill the gaps, instead of a
    long file starting last and running alone at the end. The order within a file is kept."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # a stable sort: only files move

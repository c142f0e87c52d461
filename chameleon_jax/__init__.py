"""chameleon-jax: an early-fusion mixed-modal transformer in JAX / Flax NNX."""

__version__ = "0.1.0"

# Public entry points, imported on first use so `import chameleon_jax` stays light.
_LAZY = {
    "load_model": ("chameleon_jax.checkpoint", "load_model"),
    "load_pipeline": ("chameleon_jax.pipeline", "load_pipeline"),
    "Pipeline": ("chameleon_jax.pipeline", "Pipeline"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'chameleon_jax' has no attribute {name!r}")

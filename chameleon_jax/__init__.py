"""chameleon-jax: an early-fusion mixed-modal transformer in JAX / Flax NNX."""

__version__ = "0.1.0"

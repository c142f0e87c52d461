"""Mixed-modal generation: one compiled decode loop with a per-row text/image state machine.

- sampling.py: masking, temperature, top-k, top-p, greedy, seeded choice
- modes.py: which tokens a row may emit in text or image mode, and how modes switch
- guidance.py: classifier-free guidance streams for image tokens (two- and three-stream)
- decode.py: prefill + `lax.while_loop` over a fixed KV cache (`generate_tokens`)
- jacobi.py: speculative Jacobi decoding of image codes inside that loop (several codes per
  forward pass, the same distribution; `generate_tokens(..., image_decoding="jacobi")`)
"""

from chameleon_jax.generation.decode import DecodeResult, FrozenModel, freeze, generate_tokens
from chameleon_jax.generation.guidance import Guidance, resolve_guidance
from chameleon_jax.generation.sampling import SamplingParams

__all__ = ["DecodeResult", "FrozenModel", "Guidance", "freeze", "SamplingParams", "generate_tokens", "resolve_guidance"]

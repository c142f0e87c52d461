"""The typed configuration library, shared with the image tokenizer: see `vqvae.configlib`.

It lives in `vqvae` so that the tokenizer stands alone (it imports nothing from
`chameleon_jax`); `chameleon_jax` depends on `vqvae`, never the reverse.
"""

from vqvae.configlib import *  # noqa: F401,F403
from vqvae.configlib import ConfigError, param  # noqa: F401

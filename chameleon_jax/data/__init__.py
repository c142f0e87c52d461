"""Data: the Document type, the JSON Lines user format, and the built-in data sets.

    from chameleon_jax.data import Document, Segment, load_jsonl
    from chameleon_jax.data import shapes
"""

from chameleon_jax.data.documents import TASKS, DataError, Document, Segment
from chameleon_jax.data.jsonl import load_jsonl, read_image, write_jsonl
from chameleon_jax.data.paths import data_dir

__all__ = ["TASKS", "DataError", "Document", "Segment", "data_dir", "load_jsonl", "read_image", "write_jsonl"]

"""Image tokenizers: images (uint8) <-> discrete codes."""

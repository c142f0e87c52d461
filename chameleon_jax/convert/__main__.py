"""python -m chameleon_jax.convert {hf,meta,export-hf} SRC DST [options]: import released weights, export ours."""

from __future__ import annotations

import argparse
import sys

from chameleon_jax.convert import ConversionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chameleon_jax.convert", description=__doc__)
    sub = parser.add_subparsers(dest="format", required=True)
    for name, help_text in (
        ("hf", "a Hugging Face ChameleonForConditionalGeneration directory (config.json + *.safetensors)"),
        ("meta", "Meta's release directory (params.json + consolidated*.pth)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("src", help="checkpoint directory to read")
        p.add_argument("dst", help="model directory to write (config.json, params/, chameleon_tokenizer.json)")
        p.add_argument("--param-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                       help="storage dtype of the imported parameters (auto: the checkpoint's)")
        p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                       help="compute dtype written to the config (default: the parameter dtype)")
        p.add_argument("--no-scan-layers", dest="scan_layers", action="store_false",
                       help="store the blocks one by one instead of stacked for nnx.scan")
        if name == "meta":
            p.add_argument("--tokenizer", default=None,
                           help="text_tokenizer.json to copy (default: looked for beside the checkpoint)")
    p = sub.add_parser("export-hf", help="write a model directory as a Hugging Face Chameleon directory")
    p.add_argument("src", help="model directory to read (config.json, params/, vocab/ or chameleon_tokenizer.json)")
    p.add_argument("dst", help="new directory for config.json, model.safetensors and the tokenizer files")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="storage dtype of the written tensors (auto: the model's)")
    args = parser.parse_args(argv)

    if args.format == "export-hf":
        return _export(args)
    kwargs = dict(param_dtype=args.param_dtype, dtype=args.dtype, scan_layers=args.scan_layers)
    try:
        if args.format == "hf":
            from chameleon_jax.convert.hf import import_hf

            cfg = import_hf(args.src, args.dst, **kwargs)
        else:
            from chameleon_jax.convert.meta import import_meta

            cfg = import_meta(args.src, args.dst, tokenizer=args.tokenizer, **kwargs)
    except (ConversionError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from pathlib import Path

    from chameleon_jax.convert import TOKENIZER_FILE

    print(f"wrote {args.dst}: {cfg.num_layers} layers, hidden {cfg.hidden_dim}, heads {cfg.num_heads}/"
          f"{cfg.num_kv_heads}, vocab {cfg.vocab_size}, qk_norm {cfg.qk_norm}, swin_norm {cfg.swin_norm}, "
          f"params {cfg.param_dtype}")
    if not (Path(args.dst) / TOKENIZER_FILE).is_file():
        print(f"note: no tokenizer file found to copy; put it at {Path(args.dst) / TOKENIZER_FILE}", file=sys.stderr)
    return 0


def _export(args) -> int:
    from chameleon_jax.checkpoint import CheckpointError
    from chameleon_jax.convert.export_hf import export_hf
    from chameleon_jax.vocab import VocabularyError

    try:
        summary = export_hf(args.src, args.dst, dtype=args.dtype)
    except (ConversionError, CheckpointError, VocabularyError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {summary['tensors']} tensors in {summary['dtype']}, vocabulary of {summary['vocab']}, "
          f"image tokenizer: {summary['image_tokenizer']}, taming VQGAN: {summary['vqgan']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

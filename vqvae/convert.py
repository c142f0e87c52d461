"""Import released VQGAN weights into a tokenizer directory, and export ours back.

    python -m vqvae.convert taming SRC DST [image_size=512 ...]
    python -m vqvae.convert hf SRC DST
    python -m vqvae.convert export-taming TOKENIZER_DIR OUT.safetensors|OUT.ckpt

taming: a taming-transformers / Chameleon state dict (`encoder.*`, `decoder.*`,
  `quantize.embedding.weight`, `quant_conv.*`, `post_quant_conv.*`; other keys such
  as `loss.*` are ignored) from a `.ckpt`/`.pt`/`.pth` file (read with
  `torch.load(weights_only=True)`, a top-level "state_dict" is unwrapped; torch is
  needed only for these) or a `.safetensors` file. The shape (channels, levels,
  res blocks, attention, codebook) is read from the tensors; the image size is not
  stored in them and defaults to 512 (override with image_size=...).
hf: a Hugging Face directory (config.json + *.safetensors) of `ChameleonVQVAE` or of a
  whole Chameleon model (the `vqmodel.` sub-module is taken). Hugging Face ships the
  encoder only, so the tokenizer encodes but cannot decode unless decoder weights
  are present.

Layout differences handled here: torch convolutions are OIHW and ours HWIO; GroupNorm
`weight` is our `scale`; the taming codebook `quantize.embedding.weight` is our
`quantize.codebook`. A tensor that is missing or has the wrong shape is an error
naming it. The export inverts the same names and layouts (`to_taming_state_dict`,
`to_hf_state_dict`, `hf_vq_config`); only tokenizers with the taming encoder and a
codebook (vq, or l2_ema whose unit codes export as a plain codebook) have an
equivalent there. Safetensors files are read and written by this module directly (memory-mapped, bf16
included), so the hf path needs neither torch nor transformers.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from vqvae import configlib
from vqvae.config import VQConfig


class ConversionError(ValueError):
    """A source tensor is missing, has the wrong shape, or the source cannot be read."""


# --------------------------------------------------------------------------- reading files

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str | Path, keep: Callable[[str], bool] = lambda name: True) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file whose names pass `keep`, as float32/int numpy arrays."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or not keep(name):
            continue
        start, end = info["data_offsets"]
        raw = data[start:end]
        if info["dtype"] == "BF16":
            import ml_dtypes

            arr = np.frombuffer(raw, dtype=ml_dtypes.bfloat16).astype(np.float32)
        elif info["dtype"] in _ST_DTYPES:
            arr = np.frombuffer(raw, dtype=_ST_DTYPES[info["dtype"]])
        else:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        arr = arr.reshape(info["shape"])
        out[name] = arr.astype(np.float32) if arr.dtype.kind == "f" else np.array(arr)
    return out


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray]) -> Path:
    """Writes float32/int numpy arrays as a .safetensors file (the inverse of `read_safetensors`)."""
    names = {np.dtype(v).name: k for k, v in _ST_DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for name, value in tensors.items():
        value = np.ascontiguousarray(value)
        if value.dtype.name not in names:
            raise ConversionError(f"cannot write tensor {name} of dtype {value.dtype} to safetensors")
        blob = value.tobytes()
        header[name] = {"dtype": names[value.dtype.name], "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            f.write(blob)
    tmp.replace(path)
    return path


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"reading {path.name} needs PyTorch (pip install torch), or convert it to .safetensors first"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with non-tensor objects refuse to load safely
        raise ConversionError(
            f"torch.load({path}, weights_only=True) failed: {e}. The file holds more than tensors; "
            "in an environment you trust, load it and save its state_dict with safetensors, then convert that."
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()
            if hasattr(v, "detach")}


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A taming-style state dict from .safetensors or a torch checkpoint (.ckpt/.pt/.pth/.bin)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return _read_torch(path)


# --------------------------------------------------------------------------- names and layouts


def _our_name(path: tuple) -> str:
    """nnx state path -> taming key (`('encoder', 'down', 0, 'block', 1, 'norm1', 'scale')` ->
    `encoder.down.0.block.1.norm1.weight`)."""
    parts = [str(p) for p in path]
    if parts == ["quantize", "codebook"]:
        return "quantize.embedding.weight"
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def _to_ours(name: str, value: np.ndarray, want_shape: tuple) -> np.ndarray:
    """Torch layout -> ours (conv OIHW -> HWIO); anything else is taken as is."""
    if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
    return value


def _to_torch(value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1)) if value.ndim == 4 else value


def _torch_shape(shape: tuple) -> tuple:
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)


def exportable(cfg: VQConfig, *, hf: bool = False) -> None:
    """Raises ConversionError when a model of `cfg` has no taming (or, with hf, Hugging Face) equivalent."""
    if cfg.encoder != "vqgan":
        raise ConversionError(f"only the taming conv encoder exports; this tokenizer uses encoder={cfg.encoder!r}")
    if cfg.quantizer == "fsq":
        raise ConversionError("an FSQ tokenizer has no codebook to export: taming and Hugging Face VQGANs "
                              "look codes up in a learned codebook (quantizer vq or l2_ema)")
    if hf and (cfg.norm_groups, cfg.norm_eps) != (32, 1e-6):
        raise ConversionError(f"Hugging Face's ChameleonVQVAE hard-codes GroupNorm(32, eps 1e-6); this tokenizer "
                              f"uses {cfg.norm_groups} groups, eps {cfg.norm_eps}")
    if hf and cfg.attn_resolutions and not cfg.mid_attention:
        raise ConversionError("Hugging Face's ChameleonVQVAE has attention in the middle block whenever it has any")


def to_taming_state_dict(model) -> dict[str, np.ndarray]:
    """Our model's parameters in taming naming and torch layout (float32 numpy).

    An l2_ema codebook exports as a plain one: its rows are unit vectors, so the
    nearest code by squared distance is the code of highest cosine, as in training.
    """
    from flax import nnx

    exportable(model.cfg)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    out = {_our_name(path): _to_torch(np.asarray(var[...], np.float32)) for path, var in flat}
    if model.cfg.quantizer == "l2_ema":
        out["quantize.embedding.weight"] = np.asarray(model.quantize.codebook[...], np.float32)
    return out


def to_hf_state_dict(model, prefix: str = "model.vqmodel.") -> dict[str, np.ndarray]:
    """The encoder side (encoder, quant_conv, codebook, post_quant_conv) in Hugging Face's
    `ChameleonVQVAE` naming, which is taming's; HF has no decoder."""
    exportable(model.cfg, hf=True)
    return {prefix + k: v for k, v in to_taming_state_dict(model).items() if not k.startswith("decoder.")}


def load_into_model(cfg: VQConfig, state_dict: Mapping[str, np.ndarray]):
    """Builds a VQModel of `cfg` from a taming-named state dict; returns (model, ignored source keys)."""
    import jax
    from flax import nnx

    from vqvae.model import VQModel

    if cfg.quantizer != "vq":
        raise ConversionError(f"taming / Chameleon weights use the plain vq quantizer, not {cfg.quantizer!r}")
    abstract = nnx.eval_shape(lambda: VQModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    used = set()
    missing, wrong = [], []
    for path, var in nnx.to_flat_state(state):
        name = _our_name(path)
        want = tuple(var.shape)
        if name not in state_dict:
            missing.append(name)
            continue
        value = np.asarray(state_dict[name])
        if tuple(value.shape) != _torch_shape(want):
            wrong.append(f"{name}: expected {_torch_shape(want)}, got {tuple(value.shape)}")
            continue
        var.set_value(jax.numpy.asarray(_to_ours(name, value, want), dtype=var.dtype))
        used.add(name)
    if missing or wrong:
        lines = [f"missing tensor {m}" for m in missing[:20]] + [f"wrong shape {w}" for w in wrong[:20]]
        more = len(missing) + len(wrong) - len(lines)
        raise ConversionError(
            "the state dict does not fit the model:\n  " + "\n  ".join(lines) + (f"\n  ... and {more} more" if more > 0 else "")
        )
    return nnx.merge(graphdef, state), sorted(set(state_dict) - used)


# --------------------------------------------------------------------------- configs


def infer_taming_config(sd: Mapping[str, np.ndarray], image_size: int = 512) -> VQConfig:
    """Reads the model shape from the tensors of a taming state dict."""

    def need(key):
        if key not in sd:
            raise ConversionError(f"missing tensor {key} (is this a taming VQGAN state dict?)")
        return sd[key]

    base = need("encoder.conv_in.weight").shape[0]
    levels = 0
    while f"encoder.down.{levels}.block.0.conv1.weight" in sd:
        levels += 1
    if levels == 0:
        raise ConversionError("missing tensor encoder.down.0.block.0.conv1.weight")
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // base for i in range(levels))
    blocks = 0
    while f"encoder.down.0.block.{blocks}.conv1.weight" in sd:
        blocks += 1
    attn = tuple(image_size // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd)
    z_out = need("encoder.conv_out.weight").shape[0]
    embed_dim, z_in = need("quant_conv.weight").shape[:2]
    if z_out != z_in:
        raise ConversionError(
            f"encoder.conv_out has {z_out} outputs but quant_conv takes {z_in}: double_z encoders are not supported"
        )
    codes, dim = need("quantize.embedding.weight").shape
    if dim != embed_dim:
        raise ConversionError(f"quantize.embedding.weight has width {dim}, quant_conv outputs {embed_dim}")
    return VQConfig(
        image_size=image_size, base_channels=base, channel_mult=mult, num_res_blocks=blocks,
        attn_resolutions=attn, mid_attention="encoder.mid.attn_1.q.weight" in sd, norm_groups=32,
        norm_eps=1e-6, z_channels=z_in, embed_dim=embed_dim, quantizer="vq", codebook_size=codes,
        decoder="decoder.conv_in.weight" in sd,
    )


def hf_config(hf: Mapping[str, Any], has_decoder: bool) -> VQConfig:
    """VQConfig from a ChameleonVQVAEConfig dict (or a ChameleonConfig dict holding `vq_config`)."""
    vq = hf.get("vq_config", hf) or {}
    if vq.get("double_latent", False):
        raise ConversionError("double_latent=true Chameleon VQ configs are not supported")
    if vq.get("in_channels", 3) != 3:
        raise ConversionError(f"in_channels must be 3, got {vq.get('in_channels')}")
    vanilla = vq.get("attn_type", "vanilla") == "vanilla"
    return VQConfig(
        image_size=int(vq.get("resolution", 512)),
        base_channels=int(vq.get("base_channels", 128)),
        channel_mult=tuple(int(m) for m in vq.get("channel_multiplier", (1, 1, 2, 2, 4))),
        num_res_blocks=int(vq.get("num_res_blocks", 2)),
        attn_resolutions=tuple(int(r) for r in (vq.get("attn_resolutions") or ())) if vanilla else (),
        mid_attention=vanilla,
        norm_groups=32,
        norm_eps=1e-6,
        z_channels=int(vq.get("latent_channels", 256)),
        embed_dim=int(vq.get("embed_dim", 256)),
        quantizer="vq",
        codebook_size=int(vq.get("num_embeddings", 8192)),
        beta=float(vq.get("beta", 0.25)),
        decoder=has_decoder,
    )


def hf_vq_config(cfg: VQConfig) -> dict[str, Any]:
    """The ChameleonVQVAEConfig dict of `cfg` (the inverse of `hf_config`)."""
    exportable(cfg, hf=True)
    return {
        "model_type": "chameleon_vqgan", "embed_dim": cfg.embed_dim, "num_embeddings": cfg.codebook_size,
        "double_latent": False, "latent_channels": cfg.z_channels, "resolution": cfg.image_size, "in_channels": 3,
        "base_channels": cfg.base_channels, "channel_multiplier": list(cfg.channel_mult),
        "num_res_blocks": cfg.num_res_blocks, "attn_resolutions": list(cfg.attn_resolutions),
        "dropout": 0.0, "attn_type": "vanilla" if cfg.mid_attention else "none",
    }


def _strip_vq_prefix(names) -> dict[str, str]:
    """{our key: source key}: drops everything up to `vqmodel.` (whole-model checkpoints)."""
    out = {}
    for name in names:
        if "vqmodel." in name:
            out[name.split("vqmodel.", 1)[1]] = name
        elif name.split(".", 1)[0] in ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv"):
            out[name] = name
    return out


def read_hf(src: str | Path) -> tuple[VQConfig, dict[str, np.ndarray]]:
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{src} is not a Hugging Face model directory (no config.json)")
    hf = json.loads(cfg_path.read_text())
    index = src / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = _strip_vq_prefix(weight_map)
        files = sorted({weight_map[n] for n in names.values()})
    else:
        files = sorted(p.name for p in src.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors weights in {src}")
    sd = {}
    for fname in files:
        tensors = read_safetensors(src / fname, keep=lambda n: bool(_strip_vq_prefix([n])))
        sd.update({ours: tensors[theirs] for ours, theirs in _strip_vq_prefix(tensors).items()})
    if not sd:
        raise ConversionError(f"no VQ tensors (encoder.*, quantize.*, ...) in {src}")
    return hf_config(hf, has_decoder="decoder.conv_in.weight" in sd), sd


# --------------------------------------------------------------------------- entry points


def _apply(cfg: VQConfig, overrides: list[str]) -> VQConfig:
    return configlib.apply_overrides(cfg, overrides) if overrides else cfg


def convert_taming(src: str | Path, dst: str | Path, overrides: list[str] = ()) -> Path:
    """Taming / Chameleon checkpoint -> tokenizer directory `dst`."""
    from vqvae.tokenizer import save_tokenizer

    sd = read_state_dict(src)
    image_size = 512
    for o in overrides:
        if o.startswith("image_size="):
            image_size = int(o.split("=", 1)[1])
    cfg = _apply(infer_taming_config(sd, image_size), list(overrides))
    model, ignored = load_into_model(cfg, sd)
    if ignored:
        print(f"ignored {len(ignored)} tensors not part of the tokenizer (e.g. {ignored[0]})", file=sys.stderr)
    return save_tokenizer(model, dst, source=f"taming:{Path(src).name}")


def convert_hf(src: str | Path, dst: str | Path, overrides: list[str] = ()) -> Path:
    """Hugging Face ChameleonVQVAE (or whole Chameleon) directory -> tokenizer directory `dst`."""
    from vqvae.tokenizer import save_tokenizer

    cfg, sd = read_hf(src)
    cfg = _apply(cfg, list(overrides))
    model, ignored = load_into_model(cfg, sd)
    if ignored:
        print(f"ignored {len(ignored)} tensors not part of the tokenizer (e.g. {ignored[0]})", file=sys.stderr)
    return save_tokenizer(model, dst, source=f"hf:{Path(src).name}")


def export_taming(src: str | Path, dst: str | Path) -> Path:
    """Tokenizer directory -> one taming-layout VQGAN file (encoder, codebook and decoder); see `write_taming`."""
    from vqvae.tokenizer import load_tokenizer

    tok = load_tokenizer(src)
    if not tok.can_decode:
        raise ConversionError(f"{src} has no decoder: a taming VQGAN file holds the whole model")
    return write_taming(tok.model, dst)


def write_taming(model, dst: str | Path) -> Path:
    """`model` as a taming-layout file: `.safetensors` writes a safetensors file; any other
    suffix (`.ckpt`, `.pt`, `.pth`) a torch checkpoint `{"state_dict": ...}`, as
    taming-transformers and Meta's Chameleon read it."""
    sd = to_taming_state_dict(model)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".safetensors":
        return write_safetensors(dst, sd)
    try:
        import torch
    except ImportError:
        raise ConversionError(f"writing {dst.name} needs PyTorch; name the file *.safetensors instead") from None
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, tmp)
    tmp.replace(dst)
    return dst


USAGE = ("usage: python -m vqvae.convert {taming,hf} SRC DST [model_key=value ...]\n"
         "       python -m vqvae.convert export-taming TOKENIZER_DIR OUT.{safetensors,ckpt}")


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) < 3 or args[0] not in ("taming", "hf", "export-taming") or any(a in ("-h", "--help") for a in args):
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    kind, src, dst, overrides = args[0], args[1], args[2], args[3:]

    def go():
        if kind == "export-taming":
            if overrides:
                raise ConversionError(f"export-taming takes no options, got {overrides}")
            print(f"wrote {export_taming(src, dst)}")
            return
        fn = convert_taming if kind == "taming" else convert_hf
        out = fn(src, dst, overrides)
        from vqvae.tokenizer import read_meta

        meta = read_meta(out)
        print(f"wrote {out}: {meta['image_size']} px -> {meta['grid'][0]}x{meta['grid'][1]} codes of "
              f"{meta['codebook_size']}, decoder={'yes' if meta['can_decode'] else 'no'}")

    try:
        configlib.main_guard(go)
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()

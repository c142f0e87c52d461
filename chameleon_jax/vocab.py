"""The unified vocabulary: the one owner of the token id layout.

Two layouts share one interface:

* own models (`Vocabulary.train`): six specials, then the sentencepiece pieces,
  then one contiguous block of `codebook_size` image codes;
* imported Chameleon checkpoints (`Vocabulary.from_chameleon_tokenizer`): the
  layout of the released BPE `tokenizer.json`, where image codes are the tokens
  named `IMGIMG...` and the code is read from the name, not from the id.

Everything else (sequence building, generation, evaluation) asks this object
for special ids, masks and code <-> id maps instead of doing id arithmetic.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

_FORMAT = "chameleon-jax-vocabulary"
_SPECIAL_NAMES = ("pad", "bos", "eos", "boi", "eoi", "eot")
# Own layout: the specials come first, in this order.
_OWN_SPECIAL_PIECES = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "boi": "<boi>", "eoi": "<eoi>", "eot": "<eot>"}
# Chameleon's tokenizer file names its specials like this.
CHAMELEON_SPECIAL_NAMES = {
    "bos": "<s>",
    "pad": "<pad>",
    "eos": "</s>",
    "boi": "<racm3:break>",
    "eoi": "<eoss>",
    "eot": "<reserved08706>",
}
CHAMELEON_IMAGE_PREFIX = "IMGIMG"


class VocabularyError(ValueError):
    """A vocabulary file is missing, malformed, or inconsistent."""


def chameleon_code_from_name(name: str) -> int:
    """`IMGIMG` + digits written as letters A-J + one trailing character -> the code.

    e.g. "IMGIMGBAZ" -> 10.
    """
    body = name[len(CHAMELEON_IMAGE_PREFIX) : -1]
    digits = "".join(str(ord(c) - ord("A")) if "A" <= c <= "J" else c for c in body)
    if not digits.isdigit():
        raise VocabularyError(f"image token name {name!r} does not encode a code (letters A-J expected)")
    return int(digits)


def chameleon_image_token_name(code: int) -> str:
    """The inverse of `chameleon_code_from_name`: 10 -> "IMGIMGBAZ"."""
    return CHAMELEON_IMAGE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(int(code))) + "Z"


class _SentencePieceText:
    """Text pieces of an own vocabulary: sentencepiece id `i` is token id `offset + i`."""

    def __init__(self, model_proto: bytes, offset: int):
        import sentencepiece as spm

        self.model_proto = model_proto
        self.offset = offset
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.num_pieces = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return [self.offset + i for i in self.sp.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) - self.offset for i in ids])


class _HFTokenizerText:
    """Text of an imported vocabulary, through the `tokenizers` library (optional dependency)."""

    def __init__(self, path: Path):
        self.path = path
        self._tok = None

    def _tokenizer(self):
        if self._tok is None:
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise ImportError(
                    "text encoding with a Chameleon tokenizer.json needs the `tokenizers` package "
                    "(pip install tokenizers)"
                ) from None
            self._tok = Tokenizer.from_file(str(self.path))
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer().encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer().decode([int(i) for i in ids], skip_special_tokens=True)


class Vocabulary:
    """Token id layout of one model: specials, text pieces and image codes.

    Attributes:
      size: number of ids in use; a model's `vocab_size` must be >= size
        (`padded_size` rounds it up for sharding-friendly embedding tables).
      pad_id, bos_id, eos_id, boi_id, eoi_id, eot_id: the special ids.
      codebook_size: number of image codes K.
      image_token_mask: bool [size], the ids that are image codes.
      text_token_mask: bool [size], the ids text mode may emit (text pieces,
        eos, eot); never pad, bos, boi, eoi, unknown or image codes.
      code_to_id: int32 [K]; id_to_code: int32 [size], -1 off the image block.
    """

    def __init__(
        self,
        *,
        kind: str,
        size: int,
        specials: dict[str, int],
        code_to_id: np.ndarray,
        text_piece_mask: np.ndarray,
        text_backend,
    ):
        self.kind = kind
        self.size = int(size)
        for name in _SPECIAL_NAMES:
            setattr(self, f"{name}_id", int(specials[name]))
        self.code_to_id = np.asarray(code_to_id, np.int32)
        self.codebook_size = int(self.code_to_id.shape[0])
        self.id_to_code = np.full((self.size,), -1, np.int32)
        self.id_to_code[self.code_to_id] = np.arange(self.codebook_size, dtype=np.int32)
        self.image_token_mask = self.id_to_code >= 0
        # Ids that decode to text: pieces only (no specials, no image codes).
        self._text_piece_mask = np.asarray(text_piece_mask, bool) & ~self.image_token_mask
        for name in _SPECIAL_NAMES:
            self._text_piece_mask[getattr(self, f"{name}_id")] = False
        self.text_token_mask = self._text_piece_mask.copy()
        self.text_token_mask[[self.eos_id, self.eot_id]] = True
        self._text = text_backend
        self._check()

    def _check(self) -> None:
        ids = [getattr(self, f"{n}_id") for n in _SPECIAL_NAMES]
        if len(set(ids)) != len(ids):
            raise VocabularyError(f"special ids collide: {dict(zip(_SPECIAL_NAMES, ids))}")
        if len(np.unique(self.code_to_id)) != self.codebook_size:
            raise VocabularyError("two image codes map to the same id")
        if self.image_token_mask[ids].any():
            raise VocabularyError("a special id is also an image code")

    # ---------------------------------------------------------------- text
    @property
    def special_ids(self) -> dict[str, int]:
        return {n: getattr(self, f"{n}_id") for n in _SPECIAL_NAMES}

    def encode_text(self, text: str) -> list[int]:
        """Text -> token ids (no bos/eos added)."""
        return self._text.encode(text)

    def decode_text(self, ids) -> str:
        """Token ids -> text; special and image ids are skipped."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        ids = ids[(ids >= 0) & (ids < self.size)]
        return self._text.decode(ids[self._text_piece_mask[ids]].tolist())

    # --------------------------------------------------------------- images
    def image_ids(self, codes):
        """Image codes (any shape, numpy or jax) -> token ids of the same shape."""
        return _lookup(self.code_to_id, codes, fill=None)

    def codes_from_ids(self, ids):
        """Token ids -> image codes (any shape, numpy or jax); -1 where an id is not an image code."""
        return _lookup(self.id_to_code, ids, fill=-1)

    def padded_size(self, multiple: int = 128) -> int:
        """`size` rounded up to a multiple (embedding rows split evenly across shards)."""
        return -(-self.size // multiple) * multiple

    def fingerprint(self) -> str:
        """A short hash of the layout and text model (changes when any id would change)."""
        import hashlib

        h = hashlib.sha1()
        h.update(json.dumps(self._layout_json(), sort_keys=True).encode())
        if isinstance(self._text, _SentencePieceText):
            h.update(self._text.model_proto)
        else:
            h.update(self._text.path.read_bytes())
        h.update(self.code_to_id.tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"Vocabulary(kind={self.kind}, size={self.size}, text_ids={int(self.text_token_mask.sum())}, "
            f"codebook_size={self.codebook_size}, specials={self.special_ids})"
        )

    # ------------------------------------------------------------ save/load
    def _layout_json(self) -> dict:
        out = {"format": _FORMAT, "version": 1, "kind": self.kind, "size": self.size,
               "codebook_size": self.codebook_size, "specials": self.special_ids}
        if isinstance(self._text, _SentencePieceText):
            out["text_offset"] = self._text.offset
            out["num_text_pieces"] = self._text.num_pieces
            out["image_offset"] = int(self.code_to_id[0])
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes `vocab.json` plus the text model (`spm.model` or `tokenizer.json`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self._text, _SentencePieceText):
            (directory / "spm.model").write_bytes(self._text.model_proto)
        elif self._text.path.resolve() != (directory / "tokenizer.json").resolve():
            shutil.copyfile(self._text.path, directory / "tokenizer.json")
        tmp = directory / "vocab.json.tmp"
        tmp.write_text(json.dumps(self._layout_json(), indent=2) + "\n")
        os.replace(tmp, directory / "vocab.json")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Vocabulary":
        directory = Path(directory)
        meta_path = directory / "vocab.json"
        if not meta_path.exists():
            raise VocabularyError(f"no vocabulary at {directory} (vocab.json missing)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _FORMAT:
            raise VocabularyError(f"{meta_path} is not a {_FORMAT} file")
        if meta["kind"] == "sentencepiece":
            vocab = cls._own(
                (directory / "spm.model").read_bytes(), meta["codebook_size"], meta["text_offset"]
            )
        elif meta["kind"] == "chameleon":
            vocab = cls.from_chameleon_tokenizer(directory / "tokenizer.json")
        else:
            raise VocabularyError(f"{meta_path}: unknown vocabulary kind {meta['kind']!r}")
        if vocab.size != meta["size"] or vocab.special_ids != {k: int(v) for k, v in meta["specials"].items()}:
            raise VocabularyError(f"{directory}: the text model does not match vocab.json's layout")
        return vocab

    # -------------------------------------------------------- constructors
    @classmethod
    def _own(cls, model_proto: bytes, codebook_size: int, text_offset: int = len(_SPECIAL_NAMES)) -> "Vocabulary":
        text = _SentencePieceText(model_proto, text_offset)
        image_offset = text_offset + text.num_pieces
        size = image_offset + codebook_size
        specials = {name: i for i, name in enumerate(_SPECIAL_NAMES)}
        piece_mask = np.zeros((size,), bool)
        piece_mask[text_offset:image_offset] = True
        # The unknown piece decodes to a placeholder; text mode never emits it.
        piece_mask[text_offset + text.sp.unk_id()] = False
        code_to_id = np.arange(image_offset, image_offset + codebook_size, dtype=np.int32)
        return cls(kind="sentencepiece", size=size, specials=specials, code_to_id=code_to_id,
                   text_piece_mask=piece_mask, text_backend=text)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        directory: str | os.PathLike,
        text_vocab_size: int,
        codebook_size: int,
        model_type: str = "bpe",
    ) -> "Vocabulary":
        """Trains a sentencepiece model on `texts` (offline) and saves the vocabulary to `directory`.

        `text_vocab_size` is an upper bound: a small corpus yields fewer pieces
        (sentencepiece's soft limit), and the layout uses the pieces it got.
        """
        import sentencepiece as spm

        lines = [t.replace("\n", " ").strip() for t in texts]
        lines = [t for t in lines if t]
        if not lines:
            raise VocabularyError("cannot train a text vocabulary: no training text")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            minloglevel=2,  # errors only
            vocab_size=int(text_vocab_size),
            hard_vocab_limit=False,
            model_type=model_type,
            character_coverage=1.0,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            split_digits=True,
        )
        vocab = cls._own(model.getvalue(), codebook_size)
        vocab.save(directory)
        return vocab

    @classmethod
    def from_chameleon_tokenizer(cls, tokenizer_json_path: str | os.PathLike) -> "Vocabulary":
        """The layout of Chameleon's released `tokenizer.json` (Hugging Face BPE format).

        Ids and names come from the file; image codes are read from the names
        of the `IMGIMG...` tokens, never assumed to sit at `code + offset`.
        """
        path = Path(tokenizer_json_path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise VocabularyError(f"no tokenizer file at {path}") from None
        name_to_id: dict[str, int] = dict(data.get("model", {}).get("vocab", {}))
        for tok in data.get("added_tokens", []):
            name_to_id[tok["content"]] = int(tok["id"])
        if not name_to_id:
            raise VocabularyError(f"{path}: no vocabulary in model.vocab or added_tokens")
        size = max(name_to_id.values()) + 1
        specials = {}
        for key, name in CHAMELEON_SPECIAL_NAMES.items():
            if name not in name_to_id:
                raise VocabularyError(f"{path}: special token {name!r} ({key}) is missing")
            specials[key] = name_to_id[name]
        image = {chameleon_code_from_name(n): i for n, i in name_to_id.items() if n.startswith(CHAMELEON_IMAGE_PREFIX)}
        if not image:
            raise VocabularyError(f"{path}: no image tokens (names beginning {CHAMELEON_IMAGE_PREFIX!r})")
        codebook_size = max(image) + 1
        missing = sorted(set(range(codebook_size)) - set(image))
        if missing:
            raise VocabularyError(f"{path}: image codes {missing[:5]}... have no token")
        code_to_id = np.array([image[c] for c in range(codebook_size)], np.int32)
        piece_mask = np.zeros((size,), bool)
        special_names = {tok["content"] for tok in data.get("added_tokens", []) if tok.get("special")}
        for n, i in name_to_id.items():
            # Reserved slots and other special markers are not text; end-of-turn is added back below.
            if n.startswith("<reserved") or n in ("<unk>",) or n in special_names:
                continue
            piece_mask[i] = True
        return cls(kind="chameleon", size=size, specials=specials, code_to_id=code_to_id,
                   text_piece_mask=piece_mask, text_backend=_HFTokenizerText(path))


def _lookup(table: np.ndarray, x, fill: int | None):
    """`table[x]` on numpy input or jax input (traceable).

    Out-of-range indices give `fill`, or raise (numpy) / clamp (jax) when `fill` is None.
    """
    if isinstance(x, (np.ndarray, list, tuple, int, np.integer)):
        x = np.asarray(x)
        bad = (x < 0) | (x >= table.shape[0])
        if not bad.any():
            return table[x]
        if fill is None:
            raise IndexError(f"index out of range [0, {table.shape[0]}): min {x.min()}, max {x.max()}")
        return np.where(bad, np.int32(fill), table[np.clip(x, 0, table.shape[0] - 1)])
    import jax.numpy as jnp

    table = jnp.asarray(table)
    if fill is None:
        return table.at[x].get(mode="clip")
    return table.at[x].get(mode="fill", fill_value=fill)

"""One tokenizer interface over a sentencepiece model or a local Hugging Face tokenizer folder.

``build_tokenizer(tokenizer_type, tokenizer_model)`` is what the data tools and the training loop call.
Nothing here downloads: a Hugging Face tokenizer must be a local folder holding ``tokenizer.json``
(optionally ``tokenizer_config.json`` and ``chat_template.jinja``), or the path of a ``tokenizer.json``.

Semantics shared by both kinds:

- ``tokenize`` never adds special tokens (no BOS, no EOS); the data tools append ``eod`` themselves.
- ``eod`` is the tokenizer's end-of-sequence token; ``pad`` falls back to ``eod`` when the tokenizer has
  no pad token; ``bos`` is ``None`` when the tokenizer has none.
- ``apply_chat_template`` renders with the tokenizer's own chat template, or with the documented default
  template (:data:`moc_megatron.data.chat.DEFAULT_CHAT_TEMPLATE`) when it has none.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

from moc_megatron.data.chat import encode_chat, render_chat

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")

# Names tried, in order, for the end-of-document token of a Hugging Face tokenizer whose
# tokenizer_config.json does not name an eos_token.
_HF_EOD_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


class MoCTokenizer(ABC):
    """The tokenizer interface used by the data tools and the training loop."""

    chat_template: str | None = None
    """The tokenizer's own Jinja chat template, or ``None``."""

    _eod: int
    _pad: int
    _bos: int | None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (special and added tokens included)."""

    @property
    def eod(self) -> int:
        """End-of-document token id."""
        return self._eod

    @property
    def pad(self) -> int:
        """Padding token id (``eod`` when the tokenizer has no pad token)."""
        return self._pad

    @property
    def bos(self) -> int | None:
        """Beginning-of-sequence token id, or ``None``."""
        return self._bos

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token added."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, single-threaded (callers parallelise with processes)."""
        return [self.tokenize(text) for text in texts]

    @abstractmethod
    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special tokens are kept in the text)."""

    @abstractmethod
    def special_token_strings(self) -> dict[str, str]:
        """``bos_token``/``eos_token``/``pad_token``/``unk_token`` strings, for chat templates."""

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer ships its own chat template."""
        return self.chat_template is not None

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> list[int] | str:
        """Render ``messages`` with the chat template and return token ids (or the text).

        Token ids are the concatenation of the per-segment tokenization that
        ``tools/preprocess_sft.py`` uses, so a prompt built here matches the fine-tuning data.
        """
        if not tokenize:
            return render_chat(self, messages, add_generation_prompt)
        ids, _ = encode_chat(self, messages, add_generation_prompt=add_generation_prompt)
        return ids


def _as_int_list(ids: Iterable[int]) -> list[int]:
    return [int(i) for i in ids]


class SentencePieceTokenizer(MoCTokenizer):
    """A sentencepiece ``.model`` file; ``eod`` is its ``</s>`` (eos) piece."""

    def __init__(self, model_path: str) -> None:
        import sentencepiece

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"sentencepiece model not found: {model_path!r}")
        self.model_path = model_path
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self._eod = self._sp.eos_id()
        if self._eod < 0:
            raise ValueError(
                f"sentencepiece model {model_path!r} has no eos piece, so it has no end-of-document token; "
                "train it with an eos id (tools/train_tokenizer.py does)"
            )
        pad_id = self._sp.pad_id()
        self._pad = pad_id if pad_id >= 0 else self._eod
        bos_id = self._sp.bos_id()
        self._bos = bos_id if bos_id >= 0 else None

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the model."""
        return self._sp.get_piece_size()

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos)."""
        return self._sp.encode(text, out_type=int)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text in one call to sentencepiece's C++ batch encoder."""
        return self._sp.encode(list(texts), out_type=int, num_threads=1)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids``."""
        return self._sp.decode(_as_int_list(ids))

    def special_token_strings(self) -> dict[str, str]:
        """Piece strings of the special ids the model defines."""
        out = {"eos_token": self._sp.id_to_piece(self._eod)}
        if self._bos is not None:
            out["bos_token"] = self._sp.id_to_piece(self._bos)
        out["pad_token"] = self._sp.id_to_piece(self._pad)
        if self._sp.unk_id() >= 0:
            out["unk_token"] = self._sp.id_to_piece(self._sp.unk_id())
        return out


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_hf_chat_template(folder: str, config: dict[str, Any]) -> str | None:
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class HuggingFaceTokenizer(MoCTokenizer):
    """A local Hugging Face tokenizer folder (``tokenizer.json`` read with the ``tokenizers`` library)."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        if os.path.isdir(path):
            folder, tokenizer_file = path, os.path.join(path, "tokenizer.json")
        else:
            folder, tokenizer_file = os.path.dirname(path) or ".", path
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(
                f"HuggingFaceTokenizer needs a local folder containing tokenizer.json (or the path of a "
                f"tokenizer.json); {path!r} has none. Hub model names are not downloaded."
            )
        self.path = path
        self._tok = Tokenizer.from_file(tokenizer_file)
        config: dict[str, Any] = {}
        config_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        self.chat_template = _read_hf_chat_template(folder, config)

        self._strings: dict[str, str] = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            content = _token_content(config.get(name))
            if content is not None and self._tok.token_to_id(content) is not None:
                self._strings[name] = content
        if "eos_token" not in self._strings:
            for candidate in _HF_EOD_CANDIDATES:
                if self._tok.token_to_id(candidate) is not None:
                    self._strings["eos_token"] = candidate
                    break
            else:
                raise ValueError(
                    f"cannot find an end-of-document token in {path!r}: set eos_token in tokenizer_config.json"
                )
        self._eod = self._tok.token_to_id(self._strings["eos_token"])
        pad = self._strings.get("pad_token")
        self._pad = self._tok.token_to_id(pad) if pad is not None else self._eod
        bos = self._strings.get("bos_token")
        self._bos = self._tok.token_to_id(bos) if bos is not None else None

    @property
    def vocab_size(self) -> int:
        """Vocabulary size, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without the post-processor's special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (set ``TOKENIZERS_PARALLELISM=false`` to keep it on one thread)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens kept."""
        return self._tok.decode(_as_int_list(ids), skip_special_tokens=False)

    def special_token_strings(self) -> dict[str, str]:
        """Special token strings from tokenizer_config.json (eos always present)."""
        return dict(self._strings)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str) -> MoCTokenizer:
    """Load a tokenizer.

    Args:
        tokenizer_type: ``"SentencePieceTokenizer"`` or ``"HuggingFaceTokenizer"`` (Megatron-LM's names).
        tokenizer_model: a sentencepiece ``.model`` file, or a local Hugging Face tokenizer folder.
    """
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; expected one of {', '.join(TOKENIZER_TYPES)}")

"""The tokenizer of an exported folder: which one, whether it fits the model, and its files.

Kept in one place so a check that the tokenizer is the one the checkpoint was trained with can be
added to :func:`check_tokenizer` alone. A sentencepiece ``.model`` is converted to a ``tokenizer.json``
(``tokenizers`` library, loads in transformers 4.x and 5.x) and the conversion is verified to encode
like sentencepiece on sample text; a Hugging Face tokenizer folder is copied.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from moc_megatron.data.tokenizer import MoCTokenizer, build_tokenizer
from moc_megatron.model.builder import pad_vocab_size

_SAMPLES = ("Hello world! The quick brown fox jumps over the lazy dog.",
            "  def f(x):\n\treturn x ** 2  # 42, 3.14\n", "Ünïcödé — naïve café, 東京 1999")
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class TokenizerError(ValueError):
    """The tokenizer cannot go with this model."""


@dataclass
class TokenizerSpec:
    """Which tokenizer an export writes (``model`` ``None``: none, e.g. a mock-data checkpoint)."""

    type: str | None
    model: str | None

    @classmethod
    def from_args(cls, args: dict, model: str | None, type_: str | None) -> TokenizerSpec:
        """The command line's tokenizer, else the one recorded in the checkpoint's arguments."""
        if model is None:
            return cls(args.get("tokenizer_type"), args.get("tokenizer_model"))
        if type_ is None:
            type_ = "SentencePieceTokenizer" if model.endswith(".model") and os.path.isfile(model) \
                else "HuggingFaceTokenizer"
        return cls(type_, model)

    def build(self) -> MoCTokenizer | None:
        """The project tokenizer, or ``None`` when there is none."""
        if self.model is None:
            return None
        if not os.path.exists(self.model):
            raise TokenizerError(f"tokenizer {self.model} not found (give --tokenizer-model PATH)")
        return build_tokenizer(self.type, self.model)


def check_tokenizer(spec: TokenizerSpec, model_vocab: int, args: dict, layout: dict) -> dict:
    """Special-token ids for the config; raises :class:`TokenizerError` if the vocabulary does not fit.

    The model's vocabulary is the tokenizer's padded as Megatron pads it (``--make-vocab-size-divisible-by``
    x TP of the saving run), so a tokenizer of another size is a different tokenizer.
    """
    tok = spec.build()
    if tok is None:
        return {}
    divisible = args.get("make_vocab_size_divisible_by") or 128
    padded = pad_vocab_size(tok.vocab_size, divisible, layout.get("tp") or 1)
    if tok.vocab_size > model_vocab or padded != model_vocab:
        raise TokenizerError(f"tokenizer {spec.model} has {tok.vocab_size} tokens (padded: {padded}) but the "
                             f"model's vocabulary is {model_vocab}: not the tokenizer this checkpoint was trained with")
    return {"bos_token_id": tok.bos, "eos_token_id": tok.eod, "pad_token_id": tok.pad}


def write_tokenizer(spec: TokenizerSpec, folder: str) -> None:
    """Tokenizer files into ``folder`` (nothing when there is no tokenizer)."""
    tok = spec.build()
    if tok is None:
        return
    if spec.type == "HuggingFaceTokenizer":
        source = spec.model if os.path.isdir(spec.model) else os.path.dirname(spec.model)
        for name in _HF_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
        if not os.path.isfile(os.path.join(source, "tokenizer_config.json")):
            _write_tokenizer_config(folder, tok)
        return
    fast = sentencepiece_to_tokenizers(spec.model)
    for text in _SAMPLES:
        if fast.encode(text, add_special_tokens=False).ids != tok.tokenize(text):
            raise TokenizerError(f"converting {spec.model} to tokenizer.json changes how {text!r} is tokenized")
    fast.save(os.path.join(folder, "tokenizer.json"))
    shutil.copyfile(spec.model, os.path.join(folder, "tokenizer.model"))
    _write_tokenizer_config(folder, tok)


def sentencepiece_to_tokenizers(model_path: str):
    """A ``tokenizers.Tokenizer`` built from a sentencepiece model with transformers' converter."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers.convert_slow_tokenizer import SpmConverter

    build = getattr(SpmConverter, "build_tokenizer_from_spm_proto", None)
    if build is None:
        raise TokenizerError("this transformers version cannot convert a sentencepiece model to tokenizer.json "
                             "(needs SpmConverter.build_tokenizer_from_spm_proto); pass a HF tokenizer folder")
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type == 2:  # BPE
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    else:
        vocab = [(p.piece, p.score) for p in proto.pieces]
    tokenizer = build(proto, vocab, legacy=False)
    if tokenizer is None:
        raise TokenizerError(f"{model_path}: sentencepiece model type {proto.trainer_spec.model_type} is not supported")
    tokenizer.post_processor = None  # the project's tokenize() adds no special tokens
    return tokenizer


def _write_tokenizer_config(folder: str, tok: MoCTokenizer) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000,
              "clean_up_tokenization_spaces": False, **tok.special_token_strings()}
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

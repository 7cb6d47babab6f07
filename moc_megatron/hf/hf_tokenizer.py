"""The tokenizer of an exported folder: which one, whether it fits the model, and its files.

:func:`check_tokenizer` refuses a tokenizer whose vocabulary does not fit the model and, when the checkpoint
records its tokenizer (``moc_megatron.data.tokenizer_record``), any other tokenizer than that one. The record
travels with the export as ``tokenizer_record.json`` so an import puts it back.
A sentencepiece ``.model`` is converted to a ``tokenizer.json``
(``tokenizers`` library only, loads in transformers 4.x and 5.x; ``sp_convert.py``) and the conversion is
verified to encode and decode like sentencepiece on sample text; a Hugging Face tokenizer folder is copied.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from moc_megatron.data.chat import DEFAULT_CHAT_TEMPLATE, end_of_turn
from moc_megatron.data.tokenizer import MoCTokenizer, build_tokenizer
from moc_megatron.data.tokenizer_record import (
    TokenizerMismatchError,
    TokenizerRecord,
    check_same_tokenizer,
    record_from_tokenizer,
    write_record_file,
)
from moc_megatron.errors import MoCError
from moc_megatron.hf.sp_convert import ConversionError, check_conversion, mark_special, sentencepiece_to_tokenizers
from moc_megatron.model.builder import pad_vocab_size

RECORD_FILE = "tokenizer_record.json"
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class TokenizerError(MoCError, ValueError):
    """The tokenizer cannot go with this model."""


@dataclass
class TokenizerSpec:
    """Which tokenizer an export writes (``model`` ``None``: none, e.g. a mock-data checkpoint)."""

    type: str | None
    model: str | None

    @classmethod
    def from_args(cls, args: dict, model: str | None, type_: str | None,
                  recorded: TokenizerRecord | None = None) -> TokenizerSpec:
        """The command line's tokenizer, else the one in the checkpoint's arguments, else the file its tokenizer
        record names if it is still there (an imported model's ``tokenizer.json``)."""
        if model is None:
            if args.get("tokenizer_model") is None and recorded is not None and recorded.model_path \
                    and os.path.isfile(recorded.model_path):
                return cls(recorded.tokenizer_type, recorded.model_path)
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


def check_tokenizer(spec: TokenizerSpec, model_vocab: int, args: dict, layout: dict,
                    recorded: TokenizerRecord | None = None, checkpoint: str = "the checkpoint") -> dict:
    """Special-token ids for the config; raises :class:`TokenizerError` if the tokenizer is not the model's.

    The model's vocabulary is the tokenizer's padded as Megatron pads it (``--make-vocab-size-divisible-by``
    x TP of the saving run), so a tokenizer of another size is a different tokenizer. ``recorded`` is the
    tokenizer the checkpoint was trained with (if it says): any other one is refused, naming both files.
    """
    tok = spec.build()
    if tok is None:
        return {}
    if recorded is not None:
        try:
            check_same_tokenizer(record_from_tokenizer(tok, spec.type, spec.model), f"--tokenizer-model {spec.model}",
                                 recorded, checkpoint)
        except TokenizerMismatchError as exc:
            raise TokenizerError(str(exc)) from exc
    divisible = args.get("make_vocab_size_divisible_by") or 128
    padded = pad_vocab_size(tok.vocab_size, divisible, layout.get("tp") or 1)
    if tok.vocab_size > model_vocab or padded != model_vocab:
        raise TokenizerError(f"tokenizer {spec.model} has {tok.vocab_size} tokens (padded: {padded}) but the "
                             f"model's vocabulary is {model_vocab}: not the tokenizer this checkpoint was trained with")
    return {"bos_token_id": tok.bos, "eos_token_id": tok.eod, "pad_token_id": tok.pad,
            "padding_id_without_mask": 0 if _id0_is_not_text(tok) else None}


def true_vocabulary(spec: TokenizerSpec, recorded: TokenizerRecord | None, args: dict,
                    given: int | None = None) -> tuple[int | None, str]:
    """The vocabulary the model was trained on and where it comes from: ``given`` (``--vocab-size``), else the
    tokenizer's (given or the saving run's), else the checkpoint's tokenizer record, else the saving run's
    ``--vocab-size`` when it had no tokenizer (mock data, an imported model); ``(None, ...)`` when unknown."""
    if given is not None:
        return given, "--vocab-size"
    tok = spec.build()
    if tok is not None:
        return tok.vocab_size, f"tokenizer {spec.model}"
    if recorded is not None:
        return recorded.vocab_size, "the checkpoint's tokenizer record"
    if args.get("tokenizer_type") is None and args.get("vocab_size"):
        return int(args["vocab_size"]), "the saving run's --vocab-size"
    return None, "unknown"


def check_vocab_pads_to(vocab: int, padded: int, args: dict, layout: dict, source: str) -> None:
    """Raise :class:`TokenizerError` unless ``vocab`` pads to the model's ``padded`` rows as the saving run padded."""
    divisible = args.get("make_vocab_size_divisible_by") or 128
    want = pad_vocab_size(vocab, divisible, layout.get("tp") or 1)
    if vocab > padded or want != padded:
        raise TokenizerError(f"vocabulary {vocab} ({source}) pads to {want}, but the model has {padded} rows "
                             f"(--make-vocab-size-divisible-by {divisible} x TP {layout.get('tp') or 1})")


def _id0_is_not_text(tok: MoCTokenizer) -> bool:
    """Whether token id 0 is the unk or pad token (what lm-evaluation-harness pads with)."""
    if tok.pad == 0:
        return True
    sp = getattr(tok, "_sp", None)
    if sp is not None:
        return sp.unk_id() == 0
    strings = tok.special_token_strings()
    return any(tok._tok.token_to_id(strings[k]) == 0 for k in ("unk_token", "pad_token") if k in strings)


def write_tokenizer(spec: TokenizerSpec, folder: str, recorded: TokenizerRecord | None = None) -> None:
    """Tokenizer files into ``folder`` (nothing when there is no tokenizer), with ``tokenizer_record.json``
    (``recorded``, the checkpoint's record, else the record of ``spec``)."""
    tok = spec.build()
    if tok is None:
        return
    write_record_file(os.path.join(folder, RECORD_FILE), recorded or record_from_tokenizer(tok, spec.type, spec.model))
    if spec.type == "HuggingFaceTokenizer":
        source = spec.model if os.path.isdir(spec.model) else os.path.dirname(spec.model)
        for name in _HF_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
        if not os.path.isfile(os.path.join(source, "tokenizer_config.json")):
            _write_tokenizer_config(folder, tok, tok.chat_template)
        return
    fast = sentencepiece_to_tokenizers(spec.model)
    turn_end = end_of_turn(tok)
    if turn_end is not None:  # the chat template the SFT data was rendered with goes along, its end marked special
        mark_special(fast, [turn_end[0]])
    try:
        check_conversion(spec.model, fast)
    except ConversionError as exc:
        raise TokenizerError(str(exc)) from exc
    fast.save(os.path.join(folder, "tokenizer.json"))
    shutil.copyfile(spec.model, os.path.join(folder, "tokenizer.model"))
    _write_tokenizer_config(folder, tok, tok.chat_template or (DEFAULT_CHAT_TEMPLATE if turn_end else None))


def end_of_turn_id(spec: TokenizerSpec) -> int | None:
    """The id of the token that ends an assistant turn in the export's chat template (``None``: no such token).

    It goes into ``generation_config.json`` beside the end-of-document id, so ``generate()`` stops there."""
    tok = spec.build()
    found = end_of_turn(tok) if tok is not None else None
    return None if found is None else found[1]


def _write_tokenizer_config(folder: str, tok: MoCTokenizer, chat_template: str | None) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000,
              "clean_up_tokenization_spaces": False, **tok.special_token_strings()}
    if chat_template:
        config["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

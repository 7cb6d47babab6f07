"""A sentencepiece ``.model`` as a ``tokenizers`` ``tokenizer.json`` that encodes and decodes exactly like it.

sentencepiece normalises in this order (``normalizer.cc``): the character map (``nmt_nfkc``, ``nfkc``,
``identity``, ... compiled into ``precompiled_charsmap``), dropping leading spaces, the dummy prefix ``▁``,
collapsing runs of spaces, escaping spaces as ``▁``, and dropping trailing ``▁`` last. The converted normaliser
applies the same steps in the same order. The dummy prefix is a normaliser step (``Prepend``), not a
``Metaspace`` pre-tokeniser: ``Metaspace(prepend_scheme="first")`` only prepends when the text's first character
is at offset 0 of the original text, which it is not once leading spaces were removed.

User-defined pieces are kept whole (split out after normalisation); BPE merges are ranked by the merged piece's
score (sentencepiece merges the adjacent pair whose concatenation scores highest); unigram keeps the pieces'
scores. Decoding turns ``▁`` back into spaces, byte pieces into bytes, the unknown piece into sentencepiece's
`` ⁇ `` and drops the dummy prefix's space.

:func:`check_conversion` compares the converted tokenizer with sentencepiece on a sample set (leading, trailing
and repeated spaces, tabs, newlines, digits, emoji, characters no model has seen, the model's user-defined
pieces) for both encoding and decoding, and raises naming the normaliser setting when they differ.
"""

from __future__ import annotations

import re

from moc_megatron.errors import MoCError

SAMPLES = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  def f(x):\n\treturn x ** 2  # 42, 3.14\n",
    "Ünïcödé — naïve café, 東京 1999",
    "   leading spaces, double  spaces,   triple   and trailing   ",
    "\ttab\tseparated\tvalues\t",
    "line one\nline two\n\n  indented\r\nwindows\n",
    "digits 0123456789 12345678901234567890 3.14159 -42 1e10",
    "emoji 😀🚀 👩‍💻 ✨ and flags 🇫🇷",
    "unknown ꙮ ᚠᛇᚻ 𓀀 \U0010fffd ȸ and combining e\u0301 a\u0308",
    "full-width ＡＢＣ１２３ ligature ﬁ circled ① superscript x² ½",
    "zero\u200bwidth non\u00a0breaking ideographic\u3000space",
    "control \x01\x02 chars and \x7f delete",
    "a literal lower one eighth block ▁ inside ▁▁ and at the end ▁",
    " ",
    "\n",
    "a",
    "",
)


_PLACEHOLDER = 0x10FF00  # supplementary private use area B: no character map changes these
_UNK_SURFACE = " \u2047 "  # how sentencepiece decodes the unknown piece


class ConversionError(MoCError, ValueError):
    """The converted tokenizer does not encode or decode like the sentencepiece model."""


def _proto(model_path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def settings(model_path: str) -> dict:
    """The model's normaliser and model settings (what a refusal names)."""
    proto = _proto(model_path)
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    return dict(model_type={1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(trainer.model_type, "?"),
                normalization=spec.name or "(custom charsmap)", remove_extra_whitespaces=spec.remove_extra_whitespaces,
                add_dummy_prefix=spec.add_dummy_prefix, escape_whitespaces=spec.escape_whitespaces,
                byte_fallback=trainer.byte_fallback, split_digits=trainer.split_digits,
                user_defined_symbols=[p.piece for p in proto.pieces if p.type == 4])


def sentencepiece_to_tokenizers(model_path: str):
    """A ``tokenizers.Tokenizer`` that encodes and decodes like the sentencepiece model (BPE or unigram)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    proto = _proto(model_path)
    spec, pieces, trainer = proto.normalizer_spec, proto.pieces, proto.trainer_spec
    byte_fallback = trainer.byte_fallback
    user_defined = [p.piece for p in pieces if p.type == 4]
    unk_piece = pieces[trainer.unk_id].piece
    if trainer.model_type == 2:  # BPE
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == 1}
        ranked = [(-normal[t][0], normal[t][1], t[:k], t[k:]) for t in normal for k in range(1, len(t))
                  if t[:k] in normal and t[k:] in normal]
        merges = [(a, b) for _, _, a, b in sorted(ranked)]
        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk_piece, fuse_unk=True,
                                  byte_fallback=byte_fallback, dropout=None, ignore_merges=bool(user_defined)))
    elif trainer.model_type == 1:  # unigram
        tokenizer = Tokenizer(Unigram([(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id,
                                      byte_fallback=byte_fallback))
    else:
        raise ConversionError(f"{model_path}: sentencepiece model type {settings(model_path)['model_type']} is not "
                              "supported (BPE and unigram are)")
    space = "▁" if spec.escape_whitespaces else " "
    # User-defined pieces bypass sentencepiece's character map: each is swapped for a private-use placeholder
    # around the map and put back before the spaces are escaped, then split out whole.
    hidden = {p: chr(_PLACEHOLDER + i) for i, p in enumerate(sorted(user_defined, key=len, reverse=True))}
    norms = [normalizers.Replace(p, c) for p, c in hidden.items()]
    if spec.precompiled_charsmap:
        norms += _split_crlf(spec.precompiled_charsmap)
        norms.append(normalizers.Precompiled(spec.precompiled_charsmap))
    norms += [normalizers.Replace(c, p) for p, c in hidden.items()]
    if spec.remove_extra_whitespaces:
        norms.append(normalizers.Replace(Regex(r"\A +"), ""))
    if spec.add_dummy_prefix:
        norms.append(normalizers.Prepend(" "))  # only to non-empty text, as sentencepiece
    if spec.remove_extra_whitespaces:
        norms.append(normalizers.Replace(Regex(" {2,}"), " "))
    if spec.escape_whitespaces:
        norms.append(normalizers.Replace(" ", "▁"))
    if spec.remove_extra_whitespaces:
        norms.append(normalizers.Replace(Regex(re.escape(space) + r"+\z"), ""))
    tokenizer.normalizer = normalizers.Sequence(norms)
    if user_defined:
        pattern = "|".join(re.escape(p.replace(" ", space)) for p in hidden)
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    dec = [decoders.Replace("▁", " ")] if spec.escape_whitespaces else []
    if byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Replace(unk_piece, _UNK_SURFACE))
    dec.append(decoders.Fuse())
    if spec.add_dummy_prefix:  # the prefix's space, which the first piece starts with
        dec.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(dec)
    tokenizer.add_special_tokens([p.piece for p in pieces if p.type == 3])  # control: <s>, </s>, ...
    return tokenizer


def mark_special(tokenizer, pieces: list[str]) -> None:
    """Mark user-defined ``pieces`` (e.g. the chat end-of-turn ``<|end|>``) special, so that
    ``decode(..., skip_special_tokens=True)`` drops them. Matched on the normalised text, where the
    pre-tokenizer already isolates them: encoding does not change (:func:`check_conversion` verifies)."""
    from tokenizers import AddedToken

    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=True) for p in pieces])


def _split_crlf(charsmap: bytes) -> list:
    """``tokenizers``' ``Precompiled`` maps a grapheme cluster by its first character's entry, so ``\\r\\n`` (one
    cluster) becomes one space under ``nmt_nfkc`` where sentencepiece (longest prefix, character by character)
    gives two. A character the map deletes, put between them, makes them two clusters again."""
    from tokenizers import normalizers

    pre = normalizers.Precompiled(charsmap)
    if pre.normalize_str("\r\n") == pre.normalize_str("\r") + pre.normalize_str("\n"):
        return []
    for gap in ("\x01", "\x02", "\x7f", "\ufeff"):
        if pre.normalize_str(gap) == "" and pre.normalize_str(f"\r{gap}\n") == pre.normalize_str("\r") + \
                pre.normalize_str("\n"):
            return [normalizers.Replace("\r\n", f"\r{gap}\n")]
    return []  # no such character: check_conversion reports the difference


def _differs(sp, fast, text: str) -> str | None:
    """``None`` if ``fast`` encodes and decodes ``text`` as ``sp``; else what differs."""
    want = sp.encode(text)
    got = fast.encode(text, add_special_tokens=False).ids
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        return (f"encodes {text!r} with ids {got[at:at + 6]} from token {at} on, sentencepiece with "
                f"{want[at:at + 6]}")
    # skip_special_tokens=False: a chat end-of-turn marked special (``mark_special``) still decodes to its text
    decoded, expected = fast.decode(want, skip_special_tokens=False), sp.decode(want)
    if decoded != expected:
        return f"decodes {text!r} to {decoded!r}, sentencepiece to {expected!r}"
    return None


def _culprit(sp, fast, text: str, config: dict) -> str:
    """The setting a difference comes from: the normaliser's (the normalised text differs) or the model's."""
    normalized = fast.normalizer.normalize_str(text) if fast.normalizer is not None else text
    if normalized != sp.normalize(text):
        return (f"normalization {config['normalization']!r} with remove_extra_whitespaces="
                f"{config['remove_extra_whitespaces']}, add_dummy_prefix={config['add_dummy_prefix']}")
    if config["user_defined_symbols"] and any(u in text for u in config["user_defined_symbols"]):
        return f"user_defined_symbols {config['user_defined_symbols'][:5]}"
    return f"model_type {config['model_type']} with byte_fallback={config['byte_fallback']}"


def check_conversion(model_path: str, fast, texts=()) -> None:
    """Raise :class:`ConversionError` (naming the setting) unless ``fast`` encodes and decodes :data:`SAMPLES`,
    ``texts`` and the model's user-defined pieces in context exactly as the sentencepiece model does."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    config = settings(model_path)
    user = config["user_defined_symbols"]
    probes = [p for u in user[:8] for p in (u, f" {u} x", f"x{u}y  {u}{u}\n")]
    for text in (*SAMPLES, *texts, *probes):
        problem = _differs(sp, fast, text)
        if problem is not None:
            raise ConversionError(f"{model_path}: the converted tokenizer.json {problem}; sentencepiece setting "
                                  f"{_culprit(sp, fast, text, config)} is not converted exactly")

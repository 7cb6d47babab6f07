"""Chat rendering: a conversation to token ids plus a mask that is 1 exactly on assistant tokens.

A conversation is a list of ``{"role": str, "content": str}`` messages. It is rendered with the
tokenizer's Jinja chat template, or with :data:`DEFAULT_CHAT_TEMPLATE` when the tokenizer has none::

    <|system|>
    You are terse.<|end|>
    <|user|>
    Where was Ada born?<|end|>
    <|assistant|>
    In Lisbon.<|end|>

The assistant part of a turn is what the template emits for that message after the generation prompt
(``<|assistant|>\\n``): here ``In Lisbon.<|end|>\\n``. It is found by rendering growing prefixes of the
conversation, so any template works whose rendering of ``messages[:k]`` is a prefix of the rendering of
``messages[:k+1]`` (true of the usual templates; a template that rewrites earlier turns is refused).
Each segment is tokenized on its own and the ids are concatenated, so mask boundaries are exact.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, Protocol

from moc_megatron.errors import MoCError


class ChatTokenizer(Protocol):
    """What the chat code needs of a tokenizer (:class:`moc_megatron.data.tokenizer.MoCTokenizer` has it)."""

    chat_template: str | None

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token added."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text."""

    def special_token_strings(self) -> dict[str, str]:
        """``bos_token``/``eos_token``/``pad_token``/``unk_token`` strings, for chat templates."""

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""The template used for tokenizers without their own (Jinja, Hugging Face conventions)."""

DEFAULT_CHAT_SYMBOLS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
"""Markers of the default template; ``tools/train_tokenizer.py`` makes each a single token."""

ASSISTANT_ROLE = "assistant"


class ChatTemplateError(MoCError, ValueError):
    """The chat template cannot render a conversation, or cannot give exact assistant spans."""


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check the shape of a conversation and return it; raise ``ValueError`` with the reason otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is {type(message).__name__}, expected an object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} has no string 'role'")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ('{role}') has a {type(content).__name__} 'content', expected string")
    return messages


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Same environment settings as transformers' apply_chat_template, so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def template_of(tokenizer: ChatTokenizer) -> str:
    """The template used for ``tokenizer``: its own, else :data:`DEFAULT_CHAT_TEMPLATE`."""
    return tokenizer.chat_template if tokenizer.chat_template is not None else DEFAULT_CHAT_TEMPLATE


def render_chat(
    tokenizer: ChatTokenizer,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = False,
    template: str | None = None,
) -> str:
    """Render ``messages`` to text with ``template`` (default: the tokenizer's, or the default one)."""
    compiled = _compile(template if template is not None else template_of(tokenizer))
    try:
        return compiled.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            tools=None,
            **tokenizer.special_token_strings(),
        )
    except ChatTemplateError:
        raise
    except Exception as exc:  # jinja2 errors have many types; all mean "this template cannot render this"
        raise ChatTemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from exc


def chat_segments(
    tokenizer: ChatTokenizer,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = False,
    template: str | None = None,
) -> list[tuple[str, bool]]:
    """Split the rendered conversation into ``(text, is_assistant)`` segments whose texts concatenate to it.

    Adjacent segments alternate between prompt and assistant text.
    """
    segments: list[tuple[str, bool]] = []
    rendered = ""

    def extend(upto: int, generation_prompt: bool, is_assistant: bool) -> None:
        nonlocal rendered
        text = render_chat(tokenizer, messages[:upto], generation_prompt, template) if upto or generation_prompt else ""
        if not text.startswith(rendered):
            raise ChatTemplateError(
                f"the chat template is not prefix-stable at message {upto - 1}: rendering more messages changed "
                "the text of earlier ones, so assistant spans cannot be located; use the default template "
                "(--chat-template default) or a template that only appends"
            )
        if len(text) > len(rendered):
            piece = text[len(rendered) :]
            if segments and segments[-1][1] == is_assistant:  # one segment per run, for natural tokenization
                piece = segments.pop()[0] + piece
            segments.append((piece, is_assistant))
        rendered = text

    for k, message in enumerate(messages):
        if message["role"] == ASSISTANT_ROLE:
            extend(k, True, False)  # the generation prompt belongs to the prompt side
        extend(k + 1, False, message["role"] == ASSISTANT_ROLE)
    if add_generation_prompt:
        extend(len(messages), True, False)
    return segments


def encode_chat(
    tokenizer: ChatTokenizer,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = False,
    template: str | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask that is 1 on assistant tokens."""
    ids: list[int] = []
    mask: list[int] = []
    segments = chat_segments(tokenizer, messages, add_generation_prompt, template)
    for (_, is_assistant), seg_ids in zip(segments, tokenizer.tokenize_batch([s for s, _ in segments])):
        ids.extend(seg_ids)
        mask.extend([int(is_assistant)] * len(seg_ids))
    return ids, mask


_TURN_PROBE = "Qx7"
"""Assistant text for :func:`end_of_turn`: what the template emits right after it closes the turn."""


def end_of_turn(tokenizer: ChatTokenizer) -> tuple[str, int] | None:
    """``(text, id)`` of the single token that closes an assistant turn in the chat template used for
    ``tokenizer`` (its own, else :data:`DEFAULT_CHAT_TEMPLATE`), or ``None`` when the turn does not end in
    one token of this vocabulary (e.g. the default template's ``<|end|>`` without the chat symbols)."""
    messages = [{"role": "user", "content": "a"}, {"role": ASSISTANT_ROLE, "content": _TURN_PROBE}]
    try:
        text = render_chat(tokenizer, messages)
    except ChatTemplateError:
        return None
    after = text[text.rfind(_TURN_PROBE) + len(_TURN_PROBE):]
    candidate = after.split()[0] if after.split() else ""
    if not candidate or not after.startswith(candidate):
        return None
    before, ids = tokenizer.tokenize(_TURN_PROBE), tokenizer.tokenize(_TURN_PROBE + candidate)
    if len(ids) != len(before) + 1 or ids[:len(before)] != before:
        return None
    return candidate, ids[-1]

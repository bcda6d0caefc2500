"""Chat templates: how a conversation becomes the text every stage tokenizes.

One template object drives SFT label masking, preference pairs, prompt-only rollouts and the chat
CLI, so the prompt a model is trained to answer is, token for token, the prompt it is asked at
generation time. Templates are a registry (``@register_chat_template("name")``); the argument
``chat_template`` names one, or ``tokenizer`` (the tokenizer's own jinja template from
``tokenizer_config.json`` / ``chat_template.jinja``), or is a path to a jinja file:

* ``beaver`` (default, safe-rlhf's format): ``BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:``;
  earlier assistant turns end with the EOS text; tokenized with the tokenizer's special tokens (BOS).
* jinja (``tokenizer`` or a file): rendered exactly as transformers' ``apply_chat_template`` (same
  sandboxed environment, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, special tokens as
  variables), with an optional ``system_prompt`` as a leading ``system`` message; tokenized without
  adding special tokens (the template writes them itself).

Turns are plain strings alternating user/assistant, starting with the user (the ``RawSample``
``input`` list / ``dialogue`` convention). :func:`encode_conversation` turns a context plus an answer
into ids and the answer's start; the answer always ends with exactly one EOS.
"""

from __future__ import annotations

import abc
import os
from typing import Any, Callable, ClassVar, Optional, Sequence

import numpy as np

from alignment.data.base import DatasetError, TokenizedDataset, format_prompt

__all__ = [
    "ChatTemplate",
    "BeaverTemplate",
    "JinjaTemplate",
    "CHAT_TEMPLATES",
    "register_chat_template",
    "load_chat_template",
    "check_chat_template_argument",
    "turns_to_messages",
    "encode_prompt",
    "encode_conversation",
    "conversation_labels",
    "TemplatedDataset",
]

CHAT_TEMPLATES: dict[str, Callable[..., "ChatTemplate"]] = {}
"""Name -> factory ``(tokenizer, system_prompt) -> ChatTemplate``."""


def register_chat_template(name: str) -> Callable:
    """Register a template factory under ``name`` (usable as ``chat_template: name``)."""

    def decorator(factory: Callable[..., ChatTemplate]) -> Callable[..., ChatTemplate]:
        CHAT_TEMPLATES[name] = factory
        return factory

    return decorator


def _check_turns(turns: Sequence[str], odd: bool) -> list[str]:
    if isinstance(turns, str):
        turns = [turns]
    if not isinstance(turns, (list, tuple)) or not all(isinstance(turn, str) for turn in turns):
        raise DatasetError(f"a conversation is a string or a list of strings, got {turns!r}")
    if not turns or (len(turns) % 2 == 1) != odd:
        kind = "odd (ending on a user turn)" if odd else "even (ending on an assistant turn)"
        raise DatasetError(f"this conversation needs an {kind} number of turns, got {len(turns)}")
    return list(turns)


class ChatTemplate(abc.ABC):
    """Renders conversations; ``add_special_tokens`` says whether tokenizing adds BOS/EOS itself."""

    name: ClassVar[str]
    add_special_tokens: bool = True

    @abc.abstractmethod
    def prompt(self, turns: Sequence[str] | str) -> str:
        """Text of an odd-length context ending on a user turn, followed by the assistant cue."""

    @abc.abstractmethod
    def conversation(self, turns: Sequence[str], final: bool = True) -> str:
        """Text of an even-length conversation ending on an assistant turn; ``final=False``: as it
        appears when more turns follow (with its end-of-turn text)."""


class BeaverTemplate(ChatTemplate):
    """safe-rlhf's ``BEGINNING OF CONVERSATION: USER: ... ASSISTANT:`` format (no system prompt)."""

    name = "beaver"

    def __init__(self, eos_token: str) -> None:
        self.eos_token = eos_token

    def prompt(self, turns: Sequence[str] | str) -> str:
        return format_prompt(_check_turns(turns, odd=True), eos_token=self.eos_token)

    def conversation(self, turns: Sequence[str], final: bool = True) -> str:
        turns = _check_turns(turns, odd=False)
        return self.prompt(turns[:-1]) + turns[-1] + ("" if final else self.eos_token)


def turns_to_messages(turns: Sequence[str], system_prompt: Optional[str] = None) -> list[dict[str, str]]:
    """``["hi", "hello", "bye"]`` -> ``[{"role": "user", ...}, {"role": "assistant", ...}, ...]``."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


class JinjaTemplate(ChatTemplate):
    """A transformers-style jinja chat template (``messages``, ``add_generation_prompt``, special tokens)."""

    name = "jinja"
    add_special_tokens = False

    def __init__(
        self, source: str, special_tokens: dict[str, Optional[str]], system_prompt: Optional[str] = None, origin: str = ""
    ) -> None:
        from jinja2 import TemplateError
        from jinja2.exceptions import TemplateSyntaxError

        self.source = source
        self.origin = origin or "chat template"
        self.special_tokens = {key: value for key, value in special_tokens.items() if value is not None}
        self.system_prompt = system_prompt
        try:
            self.template = _jinja_environment().from_string(source)
        except TemplateSyntaxError as error:
            raise DatasetError(f"{self.origin}: jinja syntax error at line {error.lineno}: {error.message}") from None
        except TemplateError as error:  # pragma: no cover - other compile errors
            raise DatasetError(f"{self.origin}: {error}") from None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """Exactly ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``."""
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except TemplateError as error:
            raise DatasetError(f"{self.origin}: rendering failed: {error}") from None

    def prompt(self, turns: Sequence[str] | str) -> str:
        messages = turns_to_messages(_check_turns(turns, odd=True), self.system_prompt)
        return self.render(messages, add_generation_prompt=True)

    def conversation(self, turns: Sequence[str], final: bool = True) -> str:
        messages = turns_to_messages(_check_turns(turns, odd=False), self.system_prompt)
        return self.render(messages, add_generation_prompt=False)


def _jinja_environment():
    """The environment transformers renders chat templates in (sandboxed, trimmed blocks)."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        import json

        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment


def _special_tokens(tokenizer: Any) -> dict[str, Optional[str]]:
    return {key: getattr(tokenizer, key, None) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}


def tokenizer_chat_template(tokenizer: Any) -> Optional[str]:
    """The jinja template a tokenizer carries (``tokenizer_config.json``'s ``chat_template``; for a list
    of named templates, the ``default`` one), or None."""
    source = (getattr(tokenizer, "init_kwargs", None) or {}).get("chat_template")
    if source is None and isinstance(getattr(tokenizer, "chat_template", None), str):
        source = tokenizer.chat_template
    if isinstance(source, list):
        named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)}
        source = named.get("default")
    return source if isinstance(source, str) else None


@register_chat_template("beaver")
def _beaver(tokenizer: Any, system_prompt: Optional[str] = None) -> ChatTemplate:
    if system_prompt:
        raise DatasetError(
            "system_prompt: the beaver template has no system turn; use chat_template 'tokenizer' or a jinja file"
        )
    return BeaverTemplate(tokenizer.eos_token)


@register_chat_template("tokenizer")
def _from_tokenizer(tokenizer: Any, system_prompt: Optional[str] = None) -> ChatTemplate:
    source = tokenizer_chat_template(tokenizer)
    if source is None:
        raise DatasetError(
            "chat_template: 'tokenizer' but the tokenizer has no chat_template (tokenizer_config.json "
            "'chat_template' or chat_template.jinja); use 'beaver' or a path to a jinja file"
        )
    return JinjaTemplate(source, _special_tokens(tokenizer), system_prompt, origin="the tokenizer's chat_template")


def load_chat_template(chat_template: Optional[str], tokenizer: Any, system_prompt: Optional[str] = None) -> ChatTemplate:
    """The template named by the ``chat_template`` argument: a registered name or a jinja file path."""
    if isinstance(chat_template, ChatTemplate):
        return chat_template
    name = chat_template or "beaver"
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name](tokenizer, system_prompt=system_prompt)
    path = os.path.expanduser(name)
    if not os.path.isfile(path):
        raise DatasetError(
            f"chat_template: {name!r} is neither a template name ({sorted(CHAT_TEMPLATES)}) nor a jinja file"
        )
    with open(path, encoding="utf-8") as file:
        return JinjaTemplate(file.read(), _special_tokens(tokenizer), system_prompt, origin=f"chat_template {path}")


def check_chat_template_argument(problems: Any, chat_template: Optional[str], system_prompt: Optional[str]) -> None:
    """Argument-time checks (before any tokenizer or weights load): a known name or an existing file."""
    name = chat_template or "beaver"
    if name not in CHAT_TEMPLATES and not os.path.isfile(os.path.expanduser(name)):
        problems.add("chat_template", f"{name!r} is neither one of {sorted(CHAT_TEMPLATES)} nor an existing jinja file")
    if system_prompt and name == "beaver":
        problems.add("system_prompt", "the beaver template has no system turn; use chat_template 'tokenizer' or a jinja file")


# --------------------------------------------------------------------------------------------------
# Tokenization shared by every dataset and the chat CLI
# --------------------------------------------------------------------------------------------------


def _special_token_ids(tokenizer: Any) -> dict[str, int]:
    tokens = [getattr(tokenizer, key, None) for key in ("bos_token", "eos_token", "unk_token", "pad_token")]
    tokens += list(getattr(tokenizer, "additional_special_tokens", None) or [])
    return {str(token): int(tokenizer.convert_tokens_to_ids(str(token))) for token in tokens if token}


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> np.ndarray:
    """Ids of ``text`` in which special-token strings (``</s>`` written by a template or between turns)
    are those tokens' ids, as transformers' tokenizers treat them (PaddleNLP's SentencePiece Llama
    tokenizer would spell ``</s>`` out in characters). The other pieces are tokenized on their own,
    without stripping the whitespace around special tokens."""
    specials = _special_token_ids(tokenizer)
    if not specials or not any(token in text for token in specials):
        return np.asarray(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"], dtype=np.int64)
    import re

    pattern = "(" + "|".join(re.escape(token) for token in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    if add_special_tokens and getattr(tokenizer, "add_bos_token", True) and tokenizer.bos_token_id is not None:
        ids.append(int(tokenizer.bos_token_id))
    for piece in re.split(pattern, text):
        if piece in specials:
            ids.append(specials[piece])
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def encode_prompt(template: ChatTemplate, tokenizer: Any, turns: Sequence[str] | str) -> np.ndarray:
    """Ids of the generation prompt for ``turns`` (odd length): what PPO rollouts and the chat CLI feed."""
    return _ids(tokenizer, template.prompt(turns), template.add_special_tokens)


def _common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    width = min(len(a), len(b))
    unequal = np.nonzero(a[:width] != b[:width])[0]
    return int(unequal[0]) if len(unequal) else width


def encode_conversation(
    template: ChatTemplate, tokenizer: Any, context: Sequence[str] | str, answer: str
) -> tuple[np.ndarray, int]:
    """``(ids, answer_start)`` of ``context`` (odd length) followed by the assistant ``answer``.

    ``ids[:answer_start]`` equals :func:`encode_prompt` of the context (up to tokens merged across the
    boundary, which count as prompt). The answer ends with exactly one EOS: cut after its first EOS
    (text a template writes after the end of turn, e.g. a newline, is dropped), or EOS appended.
    """
    turns = [context] if isinstance(context, str) else list(context)
    prompt_ids = encode_prompt(template, tokenizer, turns)
    full_text = template.conversation(turns + [answer])
    prompt_text = template.prompt(turns)
    if not full_text.startswith(prompt_text):
        raise DatasetError(
            f"{getattr(template, 'origin', template.name)}: the conversation does not start with the generation prompt "
            "(the template renders earlier turns differently once an answer follows); masking the prompt would be wrong"
        )
    ids = _ids(tokenizer, full_text, template.add_special_tokens)
    start = _common_prefix_length(prompt_ids, ids)
    eos = tokenizer.eos_token_id
    positions = np.nonzero(ids[start:] == eos)[0]
    if len(positions):
        ids = ids[: start + int(positions[0]) + 1]
    else:
        ids = np.append(ids, eos).astype(np.int64)
    return ids, start


def conversation_labels(
    template: ChatTemplate, tokenizer: Any, dialogue: Sequence[str]
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``(ids, spans)`` of a multi-turn ``dialogue`` (user first); ``spans`` are the ``[start, end)`` token
    ranges of the assistant turns (each through its EOS when the template ends turns with EOS).

    A trailing user turn has nothing to answer and is dropped.
    """
    turns = _check_turns(dialogue, odd=len(dialogue) % 2 == 1)
    if len(turns) % 2:
        turns = turns[:-1]
    if not turns:
        return np.zeros(0, dtype=np.int64), []
    ids, last_start = encode_conversation(template, tokenizer, turns[:-1], turns[-1])
    spans = []
    for index in range(1, len(turns) - 1, 2):
        start = _common_prefix_length(encode_prompt(template, tokenizer, turns[:index]), ids)
        turn_ids = _ids(tokenizer, template.conversation(turns[: index + 1], final=False), template.add_special_tokens)
        spans.append((start, _common_prefix_length(turn_ids, ids)))
    spans.append((last_start, len(ids)))
    return ids, spans


class TemplatedDataset(TokenizedDataset):
    """A :class:`TokenizedDataset` that renders conversations with a chat template.

    Extra keyword arguments: ``chat_template`` (name or jinja path, default ``beaver``) and
    ``system_prompt`` (jinja templates only). The template is resolved before any data is tokenized.
    """

    def __init__(self, *args: Any, chat_template: Any = None, system_prompt: Optional[str] = None, **kwargs: Any) -> None:
        tokenizer = args[1] if len(args) > 1 else kwargs["tokenizer"]
        self.chat_template = load_chat_template(chat_template, tokenizer, system_prompt)
        super().__init__(*args, **kwargs)

    def encode_prompt(self, turns: Sequence[str] | str) -> np.ndarray:
        """Generation-prompt ids of ``turns`` (not cut)."""
        return encode_prompt(self.chat_template, self.tokenizer, turns)

    def encode_answer(self, context: Sequence[str] | str, answer: str) -> tuple[np.ndarray, int]:
        """``(ids, answer_start)`` of prompt + answer + EOS, cut to ``max_length`` (a cut text loses its
        EOS, so the model does not learn to stop where the data did not; the cut is counted)."""
        ids, start = encode_conversation(self.chat_template, self.tokenizer, context, answer)
        if len(ids) > self.max_length:
            self.truncated += 1
            ids = ids[: self.max_length]
        return ids, start

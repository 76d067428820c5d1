"""Chat templates, and rendering a conversation into segments that are trained or not.

A conversation is rendered with the template one message at a time, so each assistant reply is known
exactly as a span of text: the generation prompt before it is context, the reply and the end-of-turn
token that closes it are trained. Each segment is tokenized on its own, as at inference time, where
the prompt (ending in the generation prompt) is tokenized alone and the reply is generated after it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from ..core import compat
from ..core.errors import UserError
from .named_templates import GUANACO_TEMPLATE, NAMED_TEMPLATES

def resolve_template(setting: str, tokenizer) -> str:
    """The Jinja chat template to train with, from the recipe's `data.template` setting.

    Raises:
        UserError: `tokenizer` was asked for but the tokenizer has no chat template.
    """
    own = getattr(tokenizer, "chat_template", None)
    if setting == "auto":
        return own or GUANACO_TEMPLATE
    if setting == "tokenizer":
        if not own:
            raise UserError("data.template: the tokenizer has no chat template; use a template name or a Jinja string")
        return own
    if setting in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[setting]
    return setting


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


def _render(tokenizer, template: str, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def special_token_strings(tokenizer) -> list[str]:
    """The tokenizer's special tokens as text (what may close a reply); `render_segments` takes them computed once."""
    return _special_token_strings(tokenizer)


def _special_token_strings(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            specials.add(str(token))
    return [s for s in specials if s]


def split_reply(reply_text: str, content: str, special_tokens: list[str], eos_token: str) -> tuple[str, str]:
    """Split the rendered text of one assistant message into (trained, context).

    The trained part is the reply up to and including the end-of-turn token the template writes after
    the content; what follows it (a newline before the next turn) is context. A template that writes
    no special token after the reply gets the EOS token appended, so the model learns to stop.
    """
    stripped = content.strip()
    start = reply_text.find(stripped) if stripped else -1
    content_end = start + len(stripped) if start >= 0 else len(reply_text.rstrip())
    found = _any_of(tuple(special_tokens)).search(reply_text, content_end) if special_tokens else None
    if found is not None:
        return reply_text[:found.end()], reply_text[found.end():]
    return reply_text[:content_end] + eos_token, reply_text[content_end:]


@lru_cache(maxsize=16)
def _any_of(tokens: tuple[str, ...]) -> re.Pattern:
    """A pattern for the first of `tokens` in a text; of several starting at the same place, the one that sorts
    first."""
    return re.compile("|".join(re.escape(token) for token in sorted(tokens)))


def render_segments(tokenizer, template: str, messages: list[dict], train_on_prompt: bool = False,
                    specials: list[str] | None = None) -> list[Segment]:
    """Render a conversation into consecutive segments whose texts join to the full rendering
    (plus an EOS token after each reply where the template writes no end-of-turn token).

    Raises:
        ValueError: the template does not render a conversation as an extension of its prefixes
            (it rewrites earlier turns), so the trained spans cannot be located.
    """
    specials = _special_token_strings(tokenizer) if specials is None else specials
    # Rendered one at a time as the segments are assembled: the first problem met is the one reported.
    renders = (_render(tokenizer, template, prefix, generation_prompt) for prefix, generation_prompt in _prefixes(messages))
    return _segments_of_renders(tokenizer, messages, renders, train_on_prompt, specials)


def render_segments_batch(tokenizer, template: str, conversations: list[list[dict]], train_on_prompt: bool = False,
                          specials: list[str] | None = None) -> list[list[Segment]]:
    """`render_segments` of many conversations, the same segments, with the template called twice in all (once
    for every prompt, once for every conversation up to a reply) instead of twice per reply: most of a render's
    time is the chat template's call itself, not the template.

    Raises:
        Exception: whatever the template raises for any conversation, or `render_segments`'s ValueError; render
            the conversations one by one to find which.
    """
    specials = _special_token_strings(tokenizer) if specials is None else specials
    wanted = [_prefixes(messages) for messages in conversations]
    prompts = [prefix for prefixes in wanted for prefix, generation_prompt in prefixes if generation_prompt]
    fulls = [prefix for prefixes in wanted for prefix, generation_prompt in prefixes if not generation_prompt]
    prompt_texts = iter(_render_many(tokenizer, template, prompts, generation_prompt=True))
    full_texts = iter(_render_many(tokenizer, template, fulls, generation_prompt=False))
    return [
        _segments_of_renders(tokenizer, messages,
                             iter([next(prompt_texts if generation_prompt else full_texts) for _, generation_prompt in prefixes]),
                             train_on_prompt, specials)
        for messages, prefixes in zip(conversations, wanted)
    ]


def _render_many(tokenizer, template: str, conversations: list[list[dict]], generation_prompt: bool) -> list[str]:
    if not conversations:
        return []
    # A batch is told from one conversation by its first item being a list; an empty prefix would be neither.
    if any(not conversation for conversation in conversations):
        return [_render(tokenizer, template, conversation, generation_prompt) for conversation in conversations]
    return compat.render_chat_template(tokenizer, template, conversations, generation_prompt)


def _prefixes(messages: list[dict]) -> list[tuple[list[dict], bool]]:
    """What is rendered to locate the replies: for each assistant message, the conversation before it with the
    generation prompt, then the conversation up to and including it."""
    wanted = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            wanted += [(messages[:index], True), (messages[: index + 1], False)]
    return wanted


def _segments_of_renders(tokenizer, messages: list[dict], renders: Iterator[str], train_on_prompt: bool,
                         specials: list[str]) -> list[Segment]:
    """The segments of a conversation from its `_prefixes` rendered, in that order."""
    segments: list[Segment] = []
    rendered = ""
    for message in messages:
        if message["role"] != "assistant":
            continue
        prompt, full = next(renders), next(renders)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise ValueError(
                "the chat template rewrites earlier turns when a message is added, so replies cannot be "
                "located; use another `data.template`"
            )
        trained, tail = split_reply(full[len(prompt):], message["content"], specials, tokenizer.eos_token)
        segments.append(Segment(prompt[len(rendered):], train_on_prompt))
        segments.append(Segment(trained, True))
        if tail:
            segments.append(Segment(tail, train_on_prompt))
        rendered = full
    return [s for s in segments if s.text]


def end_of_turn_token(tokenizer, template: str) -> str | None:
    """The special token that closes an assistant reply under `template` (what generation stops at)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        segments = render_segments(tokenizer, template, probe)
    except Exception:  # a template that cannot render the probe: fall back to the EOS token alone
        return None
    reply = next(s.text for s in segments if s.trained)
    return next((token for token in _special_token_strings(tokenizer) if reply.endswith(token)), None)

"""The Ollama Modelfile written beside each GGUF file: FROM the file, the chat template as an Ollama
(Go text/template) TEMPLATE, and PARAMETER stop for the tokens that end a reply.

Ollama cannot run the Jinja template stored in the GGUF file, so the TEMPLATE is derived from it: the
Jinja template is rendered on probe conversations and the text it writes around each message is read
off (the prefix and suffix of each role, what comes before the first message, the generation prompt,
a default system prompt written when there is none). The Go template writes the same text around
Ollama's messages. Before it is written, the same logic (`render_like_ollama`, a line-for-line mirror
of the Go template) is compared with the Jinja template on several conversations; a template this
model cannot describe (one that rewrites earlier turns, say) gets a Modelfile without TEMPLATE and a
warning, never a template that renders differently.

The BOS token is left out of the TEMPLATE when llama.cpp adds it itself (`add_bos_token`), as Ollama
tokenizes the rendered prompt with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..data.tokenize import tokenizer_adds_bos
from ..inference.generate import end_token_ids

# Probe contents: plain words that no template rewrites (no surrounding whitespace to trim).
SYSTEM_PROBE, USER_PROBE, ASSISTANT_PROBE, USER2_PROBE, SYSTEM2_PROBE = (
    "qlorasystemprobe", "qlorauserprobe", "qloraassistantprobe", "qlorasecondprobe", "qlorelatersystemprobe",
)

Render = Callable[[list[dict], bool], str]


class TemplateShapeError(ValueError):
    """The chat template does not write each message as prefix + content + suffix of its role."""


@dataclass(frozen=True)
class TurnFormat:
    """What a chat template writes around the messages of a conversation.

    A conversation renders as: `first_system_prefix + content + system_suffix` for a first system
    message, else `head` before the first message; then for each user or assistant message its
    role's prefix, the content and its role's suffix; then `generation_prompt`. `head` holds a default
    system prompt when the template writes one. `later_system_*` are None when the template does not
    accept a system message after the first turn.
    """

    head: str
    first_system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    later_system_prefix: str | None = None
    later_system_suffix: str | None = None


def _message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _split(text: str, probe: str, what: str) -> tuple[str, str]:
    if text.count(probe) != 1:
        raise TemplateShapeError(f"the template does not write the {what} content once, as given")
    before, _, after = text.partition(probe)
    return before, after


def _extension(longer: str, shorter: str, what: str) -> str:
    if not longer.startswith(shorter):
        raise TemplateShapeError(f"the template rewrites earlier turns when {what} is added")
    return longer[len(shorter):]


def derive_turn_format(render: Render, bos_text: str | None = None) -> TurnFormat:
    """Read the text around each message off renderings of probe conversations.

    Args:
        render: renders (messages, add_generation_prompt) with the Jinja chat template.
        bos_text: the BOS token's text when llama.cpp adds BOS itself; removed from the start.

    Raises:
        TemplateShapeError: the template is not of the prefix + content + suffix shape.
    """
    user, assistant = _message("user", USER_PROBE), _message("assistant", ASSISTANT_PROBE)
    one = render([user], False)
    generation_prompt = _extension(render([user], True), one, "the generation prompt")
    assistant_prefix, assistant_suffix = _split(_extension(render([user, assistant], False), one, "a reply"),
                                                ASSISTANT_PROBE, "assistant")
    two = one + assistant_prefix + ASSISTANT_PROBE + assistant_suffix
    user_prefix, user_suffix = _split(_extension(render([user, assistant, _message("user", USER2_PROBE)], False),
                                                 two, "a second question"), USER2_PROBE, "user")
    before_user, after_user = _split(one, USER_PROBE, "user")
    if after_user != user_suffix or not before_user.endswith(user_prefix):
        raise TemplateShapeError("the template writes the first user message differently from later ones")
    head = before_user[: len(before_user) - len(user_prefix)]
    with_system = render([_message("system", SYSTEM_PROBE), user, assistant], False)
    tail = two[len(head):]
    if not with_system.endswith(tail):
        raise TemplateShapeError("the template writes the turns after a system message differently")
    first_system_prefix, system_suffix = _split(with_system[: len(with_system) - len(tail)], SYSTEM_PROBE, "system")
    later_prefix, later_suffix = _later_system(render, two, user_prefix, user_suffix)
    if bos_text:
        head, first_system_prefix = head.removeprefix(bos_text), first_system_prefix.removeprefix(bos_text)
    return TurnFormat(head, first_system_prefix, system_suffix, user_prefix, user_suffix, assistant_prefix,
                      assistant_suffix, generation_prompt, later_prefix, later_suffix)


def _later_system(render: Render, two: str, user_prefix: str, user_suffix: str) -> tuple[str | None, str | None]:
    """Prefix and suffix of a system message after the first turn, or (None, None) where the template
    refuses one or writes it in a way this model cannot describe."""
    conversation = [_message("user", USER_PROBE), _message("assistant", ASSISTANT_PROBE),
                    _message("system", SYSTEM2_PROBE), _message("user", USER2_PROBE)]
    try:
        added = _extension(render(conversation, False), two, "a later system message")
        prefix, rest = _split(added, SYSTEM2_PROBE, "later system")
    except Exception:  # templates may raise_exception() on roles out of order: no later system messages then
        return None, None
    closing = user_prefix + USER2_PROBE + user_suffix
    if not rest.endswith(closing):
        return None, None
    return prefix, rest[: len(rest) - len(closing)]


def render_like_ollama(turns: TurnFormat, messages: list[dict]) -> str:
    """What the Go template of `go_template(turns)` renders for `messages` (kept in step with it): a
    last assistant message is left open, for Ollama to continue."""
    parts = []
    for index, message in enumerate(messages):
        role, content, last = message["role"], message["content"], index == len(messages) - 1
        if role == "system":
            if index == 0:
                parts += [turns.first_system_prefix, content, turns.system_suffix]
            elif turns.later_system_prefix is not None:
                parts += [turns.later_system_prefix, content, turns.later_system_suffix]
        else:
            if index == 0:
                parts.append(turns.head)
            if role == "user":
                parts += [turns.user_prefix, content, turns.user_suffix]
            elif role == "assistant":
                parts += [turns.assistant_prefix, content, "" if last else turns.assistant_suffix]
        if last and role != "assistant":
            parts.append(turns.generation_prompt)
    return "".join(parts)


def go_string(text: str) -> str:
    """A Go interpreted string literal of `text`; characters Ollama's Modelfile parser would drop (it
    keeps printable ones only) and quotes are escaped, so the TEMPLATE never contains three quotes."""
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif char.isprintable():
            out.append(char)
        else:
            out.append(f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def _text(value: str | None) -> str:
    return "{{ " + go_string(value) + " }}" if value else ""


def go_template(turns: TurnFormat) -> str:
    """The Ollama TEMPLATE (Go text/template over `.Messages`) that writes what `render_like_ollama` does.

    Every line starts with `{{-`, so the line breaks are layout only; all text is in string literals.
    """
    later_system = (_text(turns.later_system_prefix) + "{{ $m.Content }}" + _text(turns.later_system_suffix)
                    if turns.later_system_prefix is not None else "")
    lines = [
        "{{- range $i, $m := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{- if eq $m.Role "system" }}',
        "{{- if eq $i 0 }}" + _text(turns.first_system_prefix) + "{{ $m.Content }}" + _text(turns.system_suffix),
        "{{- else }}" + later_system + "{{ end }}",
        "{{- else }}",
        *(["{{- if eq $i 0 }}" + _text(turns.head) + "{{ end }}"] if turns.head else []),
        '{{- if eq $m.Role "user" }}' + _text(turns.user_prefix) + "{{ $m.Content }}" + _text(turns.user_suffix),
        '{{- else if eq $m.Role "assistant" }}' + _text(turns.assistant_prefix) + "{{ $m.Content }}"
        + ("{{ if not $last }}" + _text(turns.assistant_suffix) + "{{ end }}" if turns.assistant_suffix else ""),
        "{{- end }}",
        "{{- end }}",
        '{{- if and $last (ne $m.Role "assistant") }}' + _text(turns.generation_prompt) + "{{ end }}",
        "{{- end }}",
    ]
    return "\n".join(lines)


VERIFY_CONVERSATIONS = [
    [_message("user", "What is the capital of France?")],
    [_message("system", "You are a pirate."), _message("user", "Hello!\nWho are you?")],
    [_message("user", "Add 2 and 3."), _message("assistant", "It's 5."), _message("user", "And 4 + 4?")],
    [_message("system", "Answer briefly."), _message("user", "Name a colour."), _message("assistant", "Blue."),
     _message("user", "Another?"), _message("assistant", "Red."), _message("user", "One more ✅ 🦙")],
]
LATER_SYSTEM_CONVERSATION = [_message("user", "Hi."), _message("assistant", "Hello."),
                             _message("system", "Be terse."), _message("user", "Bye.")]
OPEN_REPLY_CONVERSATION = [_message("user", "Say hi."), _message("assistant", "Hi there")]


def verification_cases(turns: TurnFormat) -> list[tuple[list[dict], bool]]:
    """The conversations `render_like_ollama` is checked on, each with whether the generation prompt follows
    (not after an open last reply); a later system message only where the template accepts one."""
    cases = [(c, True) for c in VERIFY_CONVERSATIONS] + [(OPEN_REPLY_CONVERSATION, False)]
    if turns.later_system_prefix is not None:
        cases.append((LATER_SYSTEM_CONVERSATION, True))
    return cases


def rendering_differences(turns: TurnFormat, render: Render, bos_text: str | None = None) -> tuple[int, list[str]]:
    """Compare `render_like_ollama` with the Jinja template on `verification_cases`.

    Returns:
        how many conversations were compared, and a description of each rendered differently.
    """
    cases = verification_cases(turns)
    differences = []
    for conversation, generation_prompt in cases:
        expected = render(conversation, generation_prompt)
        if bos_text:
            expected = expected.removeprefix(bos_text)
        got = render_like_ollama(turns, conversation)
        if not generation_prompt:
            got += turns.assistant_suffix  # Jinja closes the last reply; Ollama leaves it open
        if got != expected:
            roles = "/".join(m["role"] for m in conversation)
            differences.append(f"a {roles} conversation differently: {got!r} != {expected!r}")
    return len(cases), differences


def verify_turn_format(turns: TurnFormat, render: Render, bos_text: str | None = None) -> None:
    """Check `render_like_ollama` against the Jinja template on several conversations.

    Raises:
        TemplateShapeError: naming the first conversation they render differently.
    """
    _, differences = rendering_differences(turns, render, bos_text)
    if differences:
        raise TemplateShapeError(f"the derived template renders {differences[0]}")


def stop_strings(tokenizer, generation_config) -> list[str]:
    """The tokens generation stops at (generate.end_token_ids: EOS ids, the chat template's end-of-turn
    token), as text: what ends a reply."""
    stops = [tokenizer.decode([token_id]) for token_id in end_token_ids(tokenizer, generation_config)]
    # A quote could not be written inside PARAMETER stop "...".
    return list(dict.fromkeys(s for s in stops if s and '"' not in s))


def modelfile_text(gguf_name: str, template: str | None, stops: list[str]) -> str:
    lines = [f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def modelfile_for(tokenizer, generation_config, gguf_name: str) -> tuple[str, str | None]:
    """The Modelfile for the GGUF file `gguf_name` of a model with `tokenizer` and `generation_config` (None
    when the model has none), and the reason there is no TEMPLATE in it (None when there is one)."""
    template, reason = None, None
    if not tokenizer.chat_template:
        reason = "the tokenizer has no chat template"
    else:
        bos_text = tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else None

        def render(messages: list[dict], generation_prompt: bool) -> str:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

        try:
            turns = derive_turn_format(render, bos_text)
            verify_turn_format(turns, render, bos_text)
            template = go_template(turns)
        except Exception as error:  # any template failure: write no TEMPLATE rather than a wrong one
            reason = str(error)
    return modelfile_text(gguf_name, template, stop_strings(tokenizer, generation_config)), reason


def write_modelfile(gguf_file: Path, tokenizer, generation_config, say=print) -> dict:
    """Write <gguf stem>.Modelfile beside `gguf_file` of a model with `tokenizer` and `generation_config`;
    returns its name, stop strings and whether it has a TEMPLATE (with the reason when not)."""
    text, reason = modelfile_for(tokenizer, generation_config, gguf_file.name)
    path = gguf_file.with_suffix(".Modelfile")
    path.write_text(text, encoding="utf-8")
    if reason is not None:
        say(f"Warning: {path.name} has no TEMPLATE ({reason}); Ollama will guess the chat format")
    return {"file": path.name, "template": reason is None, "no_template_reason": reason,
            "stop": stop_strings(tokenizer, generation_config)}

"""`qlora chat`: a multi-turn conversation with a model in the terminal, answers streamed as they come."""

from __future__ import annotations

from typing import Callable, TextIO

from transformers import TextStreamer

from .generate import generate
from ..core.models import LoadedModel

HELP = "Commands: /reset forgets the conversation, /system TEXT sets the system message, /exit leaves."


class StreamTo(TextStreamer):
    """A transformers streamer that writes the new text to `out` as it is generated."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def chat_loop(
    loaded: LoadedModel,
    read_line: Callable[[str], str],
    out: TextIO,
    *,
    system: str | None = None,
    **sampling,
) -> list[dict[str, str]]:
    """Read user turns until /exit or end of input; answer each with the whole history as context.

    Returns:
        the conversation as it stands at the end.
    """
    history: list[dict[str, str]] = []
    out.write(HELP + "\n")
    streamer = StreamTo(loaded.tokenizer, out)
    while True:
        try:
            line = read_line("you> ")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            out.write("(conversation reset)\n")
            continue
        if text.startswith("/system"):
            system = text.removeprefix("/system").strip() or None
            history = []
            out.write(f"(system message {'set' if system else 'cleared'}; conversation reset)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}. {HELP}\n")
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        out.write("model> ")
        [answer] = generate(loaded, [messages], streamer=streamer, **sampling)
        history.append({"role": "assistant", "content": answer})
    return ([{"role": "system", "content": system}] if system else []) + history

"""A transformers model judging in-process (the default judge: the bundled small model)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .judge_prompts import PAIRWISE
from .judges import JudgeReply

if TYPE_CHECKING:
    from ..core.models import LoadedModel


class LocalJudge:
    """A transformers model judging in-process, greedily, one prompt at a time: batching would pad prompts
    together, and a judgment must not depend on which other prompts it was batched with.

    With `constrained`, a pairwise verdict is the most likely of the three verdict tokens after the prompt
    and "[[" (as multiple-choice benchmarks score answers), so a small model that would not follow the
    output format still gives a verdict; relative judgments are generated freely either way.
    """

    def __init__(self, loaded: LoadedModel, max_new_tokens: int = 256, constrained: bool = True):
        self.loaded, self.max_new_tokens, self.constrained = loaded, max_new_tokens, constrained
        self.name = loaded.description + (" (constrained verdicts)" if constrained else "")

    def _verdict(self, prompt: str) -> str:
        import torch

        from ..inference.generate import prompt_ids

        tokenizer, model = self.loaded.tokenizer, self.loaded.model
        ids = prompt_ids(tokenizer, prompt) + tokenizer("[[", add_special_tokens=False)["input_ids"]
        choices = {letter: tokenizer(letter, add_special_tokens=False)["input_ids"][0] for letter in "ABC"}
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], device=next(model.parameters()).device)).logits[0, -1]
        best = max(choices, key=lambda letter: logits[choices[letter]].item())
        return f"[[{best}]]"

    def complete(self, prompt: str) -> JudgeReply:
        """The model's greedy reply; completion_tokens counts the reply re-tokenized, so it is approximate."""
        from ..inference.generate import generate, prompt_ids  # here, not at the top: it imports torch

        start, tokenizer = time.monotonic(), self.loaded.tokenizer
        if self.constrained and prompt.endswith(PAIRWISE.split("{dialogue}", 1)[1]):
            text = self._verdict(prompt)
        else:
            text = generate(self.loaded, [prompt], max_new_tokens=self.max_new_tokens, temperature=0)[0]
        completion = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return JudgeReply(text, len(prompt_ids(tokenizer, prompt)), completion, time.monotonic() - start)

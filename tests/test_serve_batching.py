"""Continuous batching (inference/engine.py) and several runs on one base (inference/served.py): replies under
load are the replies each request gets alone, rows may mix adapters, and the server survives a crowd."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from qlora_cli.inference.engine import BatchGenerator, Failed, Finished, GenerationRequest, join_rows, keep_rows

# The largest logit gap at which a batched greedy reply may part from the reply alone: the top two logits
# are then a near tie, which float rounding of batched sums (measured: |Δlogit| ~1e-6 here) may flip.
NEAR_TIE = 1e-3


class Collected:
    """What the generator delivers to one request, for a test to wait on."""

    def __init__(self):
        self.tokens, self.end, self.done = [], None, threading.Event()

    def __call__(self, item) -> None:
        if isinstance(item, list):
            self.tokens += item
        else:
            self.end = item
            self.done.set()


def alone(model, prompt: list[int], max_tokens: int, stop_ids) -> list[int]:
    """The greedy reply of `model` to `prompt` alone, by transformers' generate (what `qlora generate` runs)."""
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, eos_token_id=list(stop_ids), pad_token_id=0)
    return out[0, len(prompt):].tolist()


def logit_gap_where_they_part(model, prompt: list[int], first: list[int], second: list[int]) -> float:
    """At the first position where two replies differ: how far the alone-computed logit of `second`'s token
    is below that of `first`'s."""
    at = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + first[:at]])).logits[0, -1]
    return float(logits[first[at]] - logits[second[at]])


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from qlora_cli.inference.generate import load_for_generation

    return load_for_generation(str(tiny_model_dir))


def test_greedy_replies_under_load_are_the_replies_alone_on_the_benchmark_questions(loaded):
    from qlora_cli.evaluation.questions import read_questions
    from qlora_cli.inference.generate import prompt_ids, stop_token_ids

    model, stops = loaded.model, frozenset(stop_token_ids(loaded))
    prompts = [prompt_ids(loaded.tokenizer, q.turns[0]) for q in read_questions(None)]
    budgets = [6 + index % 11 for index in range(len(prompts))]  # rows end at different steps: others join
    generator = BatchGenerator(model, max_batch=8, max_queue=len(prompts))
    replies = [Collected() for _ in prompts]
    try:
        for prompt, budget, reply in zip(prompts, budgets, replies):
            generator.submit(GenerationRequest(prompt, budget, stops, reply))
        assert all(reply.done.wait(300) for reply in replies)
    finally:
        generator.close()
    assert all(isinstance(reply.end, Finished) for reply in replies)
    parted = []
    for prompt, budget, reply in zip(prompts, budgets, replies):
        expected = alone(model, prompt, budget, stops)
        if reply.tokens != expected:
            parted.append(logit_gap_where_they_part(model, prompt, expected, reply.tokens))
    assert all(gap < NEAR_TIE for gap in parted), parted
    assert len(parted) <= len(prompts) // 10, f"{len(parted)} of {len(prompts)} replies parted"


def test_sampled_replies_follow_their_seed_alone_or_batched(loaded):
    from qlora_cli.inference.generate import prompt_ids

    prompt = prompt_ids(loaded.tokenizer, "Tell me a story.")
    generator = BatchGenerator(loaded.model, max_batch=4)

    def sample(seed: int, company: int = 0) -> list[int]:
        others = [Collected() for _ in range(company)]
        for other in others:
            generator.submit(GenerationRequest(prompt, 12, frozenset(), other, temperature=1.0))
        reply = Collected()
        generator.submit(GenerationRequest(prompt, 12, frozenset(), reply, temperature=1.0, top_p=0.9, seed=seed))
        assert reply.done.wait(120) and all(other.done.wait(120) for other in others)
        return reply.tokens

    try:
        first = sample(7)
        assert sample(7, company=3) == first and sample(8) != first
    finally:
        generator.close()


def test_joining_pads_the_shorter_side_on_the_left_and_leaving_trims_shared_padding():
    old = [(torch.ones(2, 1, 3, 2), torch.ones(2, 1, 3, 2))]
    new = [(torch.full((1, 1, 5, 2), 2.0), torch.full((1, 1, 5, 2), 2.0))]
    layers, mask = join_rows(old, torch.ones(2, 3, dtype=torch.long), new, torch.ones(1, 5, dtype=torch.long))
    assert mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert layers[0][0].shape == (3, 1, 5, 2) and layers[0][0][0, 0, :2].abs().sum() == 0
    assert torch.equal(layers[0][1][2], new[0][1][0])
    layers, mask = keep_rows(layers, mask, [0, 1])  # the long row leaves: its padding columns go
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1]] and layers[0][0].shape == (2, 1, 3, 2)


def test_a_failing_forward_fails_its_requests_and_the_generator_goes_on(loaded, monkeypatch):
    generator = BatchGenerator(loaded.model, max_batch=2)
    forward = generator._forward
    broken = threading.Event()
    broken.set()

    def sometimes(*args, **kwargs):
        if broken.is_set():
            raise RuntimeError("out of memory (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(generator, "_forward", sometimes)
    try:
        failed = Collected()
        generator.submit(GenerationRequest([1, 40, 41], 4, frozenset(), failed))
        assert failed.done.wait(60) and isinstance(failed.end, Failed) and "simulated" in str(failed.end.error)
        broken.clear()
        works = Collected()
        generator.submit(GenerationRequest([1, 40, 41], 4, frozenset(), works))
        assert works.done.wait(60) and works.end == Finished(4, False) and len(works.tokens) == 4
    finally:
        generator.close()

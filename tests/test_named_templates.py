"""The named chat templates, decoded: the exact text of each family's format, what is trained, and BOS.

Each family gets the tiny test tokenizer with that family's special tokens added (and its own BOS
token where the family has one), and conversations go through `render_segments` and
`encode_batch` as in training. The expected texts are written out in full: they pin the formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from conftest import trained_spans

from qlora_cli.data import templates
from qlora_cli.data.named_templates import NAMED_TEMPLATES
from qlora_cli.data.templates import render_segments
from qlora_cli.data.tokenize import IGNORE_INDEX, encode_batch, tokenizer_adds_bos

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan?"},
    {"role": "assistant", "content": "Tokyo, matey."},
]
CONVERSATIONS = {"with_system": [SYSTEM, *TURNS], "without_system": TURNS}


@dataclass(frozen=True)
class Family:
    specials: tuple[str, ...]  # special tokens the family's tokenizer has, added to the tiny tokenizer
    bos: str | None  # the family's own BOS token, if not the tiny tokenizer's "<s>"
    writes_bos: bool  # the template writes BOS itself
    generation_prompt: str
    spans: tuple[str, str]  # the decoded trained spans of the two replies
    with_system: str  # the full rendering, without a BOS the tokenizer adds
    without_system: str


FAMILIES = {
    "alpaca": Family(
        specials=(),
        bos=None,
        writes_bos=False,
        generation_prompt="### Response:\n",
        spans=("Paris.</s>", "Tokyo, matey.</s>"),
        with_system=(
            "You are a helpful assistant.\n\n"
            "### Instruction:\nWhat is the capital of France?\n\n"
            "### Response:\nParis.</s>\n\n"
            "### Instruction:\nAnd of Japan?\n\n"
            "### Response:\nTokyo, matey.</s>"
        ),
        without_system=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nWhat is the capital of France?\n\n"
            "### Response:\nParis.</s>\n\n"
            "### Instruction:\nAnd of Japan?\n\n"
            "### Response:\nTokyo, matey.</s>"
        ),
    ),
    "guanaco": Family(
        specials=(),
        bos=None,
        writes_bos=False,
        generation_prompt="### Assistant:",
        spans=(" Paris.</s>", " Tokyo, matey.</s>"),
        with_system=(
            "You are a helpful assistant.\n"
            "### Human: What is the capital of France?\n"
            "### Assistant: Paris.</s>\n"
            "### Human: And of Japan?\n"
            "### Assistant: Tokyo, matey.</s>\n"
        ),
        without_system=(
            "### Human: What is the capital of France?\n"
            "### Assistant: Paris.</s>\n"
            "### Human: And of Japan?\n"
            "### Assistant: Tokyo, matey.</s>\n"
        ),
    ),
    "chatml": Family(
        specials=("<|im_start|>", "<|im_end|>"),
        bos=None,
        writes_bos=False,
        generation_prompt="<|im_start|>assistant\n",
        spans=("Paris.<|im_end|>", "Tokyo, matey.<|im_end|>"),
        with_system=(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\nParis.<|im_end|>\n"
            "<|im_start|>user\nAnd of Japan?<|im_end|>\n"
            "<|im_start|>assistant\nTokyo, matey.<|im_end|>\n"
        ),
        without_system=(
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\nParis.<|im_end|>\n"
            "<|im_start|>user\nAnd of Japan?<|im_end|>\n"
            "<|im_start|>assistant\nTokyo, matey.<|im_end|>\n"
        ),
    ),
    "llama3": Family(
        specials=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
        writes_bos=True,
        generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
        spans=("Paris.<|eot_id|>", "Tokyo, matey.<|eot_id|>"),
        with_system=(
            "<|begin_of_text|>"
            "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nAnd of Japan?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nTokyo, matey.<|eot_id|>"
        ),
        without_system=(
            "<|begin_of_text|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nAnd of Japan?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nTokyo, matey.<|eot_id|>"
        ),
    ),
    # Llama 2 writes BOS before every user turn and " </s>" after every reply (Meta's chat format); the
    # reply's leading space belongs to its first token, as at inference after " [/INST]".
    "llama2": Family(
        specials=(),
        bos=None,
        writes_bos=True,
        generation_prompt="",
        spans=(" Paris. </s>", " Tokyo, matey. </s>"),
        with_system=(
            "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nWhat is the capital of France? [/INST] Paris. </s>"
            "<s>[INST] And of Japan? [/INST] Tokyo, matey. </s>"
        ),
        without_system=(
            "<s>[INST] What is the capital of France? [/INST] Paris. </s>"
            "<s>[INST] And of Japan? [/INST] Tokyo, matey. </s>"
        ),
    ),
    # Mistral v0.3: [INST] and [/INST] are control tokens; the reply's leading space belongs to its first token.
    "mistral": Family(
        specials=("[INST]", "[/INST]"),
        bos=None,
        writes_bos=True,
        generation_prompt="",
        spans=(" Paris.</s>", " Tokyo, matey.</s>"),
        with_system=(
            "<s>[INST] You are a helpful assistant.\n\nWhat is the capital of France?[/INST] Paris.</s>"
            "[INST] And of Japan?[/INST] Tokyo, matey.</s>"
        ),
        without_system=(
            "<s>[INST] What is the capital of France?[/INST] Paris.</s>"
            "[INST] And of Japan?[/INST] Tokyo, matey.</s>"
        ),
    ),
    "zephyr": Family(
        specials=(),
        bos=None,
        writes_bos=False,
        generation_prompt="<|assistant|>\n",
        spans=("Paris.</s>", "Tokyo, matey.</s>"),
        with_system=(
            "<|system|>\nYou are a helpful assistant.</s>\n"
            "<|user|>\nWhat is the capital of France?</s>\n"
            "<|assistant|>\nParis.</s>\n"
            "<|user|>\nAnd of Japan?</s>\n"
            "<|assistant|>\nTokyo, matey.</s>\n"
        ),
        without_system=(
            "<|user|>\nWhat is the capital of France?</s>\n"
            "<|assistant|>\nParis.</s>\n"
            "<|user|>\nAnd of Japan?</s>\n"
            "<|assistant|>\nTokyo, matey.</s>\n"
        ),
    ),
    "phi3": Family(
        specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        bos=None,
        writes_bos=False,
        generation_prompt="<|assistant|>\n",
        spans=("Paris.<|end|>", "Tokyo, matey.<|end|>"),
        with_system=(
            "<|system|>\nYou are a helpful assistant.<|end|>\n"
            "<|user|>\nWhat is the capital of France?<|end|>\n"
            "<|assistant|>\nParis.<|end|>\n"
            "<|user|>\nAnd of Japan?<|end|>\n"
            "<|assistant|>\nTokyo, matey.<|end|>\n"
        ),
        without_system=(
            "<|user|>\nWhat is the capital of France?<|end|>\n"
            "<|assistant|>\nParis.<|end|>\n"
            "<|user|>\nAnd of Japan?<|end|>\n"
            "<|assistant|>\nTokyo, matey.<|end|>\n"
        ),
    ),
    # Gemma has no system role: the system message opens the first user turn.
    "gemma": Family(
        specials=("<bos>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        writes_bos=True,
        generation_prompt="<start_of_turn>model\n",
        spans=("Paris.<end_of_turn>", "Tokyo, matey.<end_of_turn>"),
        with_system=(
            "<bos>"
            "<start_of_turn>user\nYou are a helpful assistant.\n\nWhat is the capital of France?<end_of_turn>\n"
            "<start_of_turn>model\nParis.<end_of_turn>\n"
            "<start_of_turn>user\nAnd of Japan?<end_of_turn>\n"
            "<start_of_turn>model\nTokyo, matey.<end_of_turn>\n"
        ),
        without_system=(
            "<bos>"
            "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
            "<start_of_turn>model\nParis.<end_of_turn>\n"
            "<start_of_turn>user\nAnd of Japan?<end_of_turn>\n"
            "<start_of_turn>model\nTokyo, matey.<end_of_turn>\n"
        ),
    ),
}


def family_tokenizer(model_dir, name: str, *, adds_bos: bool = True):
    """The tiny tokenizer with the family's special tokens; it puts BOS first by default iff `adds_bos`."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    family = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    added: dict = {}
    if family.specials:
        added["additional_special_tokens"] = list(family.specials)
    if family.bos:
        added["bos_token"] = family.bos
    if added:
        tokenizer.add_special_tokens(added)
    bos = tokenizer.bos_token
    if adds_bos:
        # As the family's own tokenizer does: put its BOS (not the tiny tokenizer's "<s>") first.
        processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
        )
    else:
        processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    tokenizer.backend_tokenizer.post_processor = processor
    assert tokenizer_adds_bos(tokenizer) is adds_bos
    return tokenizer


def encode(tokenizer, name: str, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Ids and labels as `tokenize_examples` computes them."""
    segments = render_segments(tokenizer, NAMED_TEMPLATES[name], messages)
    bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    return encode_batch(tokenizer, [segments], bos_id=bos_id)[0]


def test_every_named_template_is_covered():
    assert set(NAMED_TEMPLATES) == set(FAMILIES)
    assert NAMED_TEMPLATES["guanaco"] == templates.GUANACO_TEMPLATE
    # The recipe schema lists the names without importing this module.
    from qlora_cli.core.recipe import TEMPLATE_NAMES

    assert set(TEMPLATE_NAMES) == set(NAMED_TEMPLATES)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_trained_spans_are_each_reply_and_its_end_of_turn_token(tiny_model_dir, name, conversation):
    tokenizer = family_tokenizer(tiny_model_dir, name)
    input_ids, labels = encode(tokenizer, name, CONVERSATIONS[conversation])
    spans = [tokenizer.decode(span) for span in trained_spans(labels)]
    assert spans == list(FAMILIES[name].spans)
    # Every trained position is a real input token (labels are the ids themselves).
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, input_ids))


@pytest.mark.parametrize("adds_bos", [True, False], ids=["tokenizer_adds_bos", "no_bos"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_full_text_and_exactly_one_bos(tiny_model_dir, name, conversation, adds_bos):
    family = FAMILIES[name]
    tokenizer = family_tokenizer(tiny_model_dir, name, adds_bos=adds_bos)
    input_ids, labels = encode(tokenizer, name, CONVERSATIONS[conversation])
    expected = getattr(family, conversation)
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if adds_bos and not family.writes_bos:
        expected = bos + expected
    assert tokenizer.decode(input_ids) == expected
    if adds_bos or family.writes_bos:
        assert input_ids[0] == bos_id and input_ids[1] != bos_id
        assert labels[0] == IGNORE_INDEX
        # Llama 2 alone writes BOS again at the start of each later user turn, as Meta's format does.
        user_turns = sum(m["role"] == "user" for m in CONVERSATIONS[conversation])
        assert input_ids.count(bos_id) == (user_turns if name == "llama2" else 1)
    else:
        assert bos_id not in input_ids
    # The tiny tokenizer's own "<s>" never sneaks in for families with another BOS.
    if family.bos:
        assert tokenizer.convert_tokens_to_ids("<s>") not in input_ids


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generation_prompt_is_a_prefix_of_the_full_rendering(tiny_model_dir, name, conversation):
    tokenizer = family_tokenizer(tiny_model_dir, name)
    template, messages = NAMED_TEMPLATES[name], CONVERSATIONS[conversation]

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages[:upto], chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    for index, message in enumerate(messages):
        if index and message["role"] == "assistant":
            before, prompt, full = render(index, False), render(index, True), render(index + 1, False)
            assert prompt.startswith(before) and full.startswith(prompt)
            assert prompt[len(before):] == FAMILIES[name].generation_prompt
            assert getattr(FAMILIES[name], conversation).startswith(prompt)
    # No template rewrites an earlier turn when a message is added.
    for upto in range(1, len(messages)):
        assert render(upto + 1, False).startswith(render(upto, False))


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_rendering_many_conversations_at_once_gives_each_ones_own_segments(tiny_tokenizer, name):
    conversations = [CONVERSATIONS["with_system"], CONVERSATIONS["without_system"], TURNS[:2], [SYSTEM, *TURNS[:2]]]
    for train_on_prompt in (False, True):
        one_by_one = [render_segments(tiny_tokenizer, NAMED_TEMPLATES[name], c, train_on_prompt) for c in conversations]
        at_once = templates.render_segments_batch(tiny_tokenizer, NAMED_TEMPLATES[name], conversations, train_on_prompt)
        assert at_once == one_by_one

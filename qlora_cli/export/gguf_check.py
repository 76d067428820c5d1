"""llama.cpp as the judge of a GGUF export (through llama-cpp-python, when it is installed).

Two questions, each answered by llama.cpp itself rather than by a reader of the file written here:

- does llama.cpp tokenize text as the model's tokenizer did in training? `CHECK_LINES` are a few
  hundred varied lines (contractions, numbers, code, whitespace runs, unicode, chat-formatted text);
  only the vocabulary is loaded, so this is cheap at any model size and runs after every export;
- does the file compute what the merged model computes? Greedy continuations in llama.cpp against
  the merged model in transformers, with the weights rounded to float16 as in an f16 file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..core import compat
from ..data.tokenize import encode_prompt, tokenizer_adds_bos
from ..inference.generate import stop_token_ids
from ..core.models import LoadedModel
from .modelfile import derive_turn_format, go_template, rendering_differences

INSTALL_HINT = "pip install llama-cpp-python"

_CONTRACTIONS = [
    "it's", "It's a trap!", "I'm sure it's fine, isn't it?", "don't won't can't shouldn't", "we've they'll she'd you're",
    "I'VE BEEN TOLD HE'S THERE", "We'Ve a'lL 'RE 'M 'D", "rock 'n' roll 'til dawn", "y'all'd've", "'quoted' words 'here'",
    "the cat's toy and the cats' toys", "O'Brien's and D'Angelo's", "'s 't 're 've 'm 'll 'd",
]
_NUMBERS = [
    "3 33 333 3333 33333 333333", "1,234,567.89", "3.14159265358979", "1e-9 and 6.02e23", "version 1.2.3-rc4",
    "2024-12-01T10:30:00Z", "$19.99 or €5,50", "50% of 200 is 100", "0x1F 0b1010 0o777", "+1 (555) 010-9999",
    "1314151天", "Room 101, floor 7", "-273.15°C", "1/2 + 3/4 = 5/4", "π ≈ 3.14, e ≈ 2.718", "12345678901234567890",
]
_CODE = [
    "def add(a, b):\n    return a + b", "    if x == 0:\n        return None  # nothing to do",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }", "  # a comment after two spaces", "x = {'a': 1, \"b\": [2, 3]}",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;", "<div class=\"box\">Hello</div>",
    "$ pip install -e \".[test]\" && python -m pytest -q", "regex: ^[a-z0-9_.+-]+@[a-z0-9-]+\\.[a-z]{2,}$",
    "fn main() -> Result<(), Box<dyn Error>> {\n\tprintln!(\"hi\");\n}", "```python\nprint('hi')\n```",
    "a=b+c*d/e-f%g**h//i", "lambda x: x**2 if x > 0 else -x", "    \n    \n", "#include <stdio.h>\n\nint main(void) {}",
    "{\"key\": \"value\", \"list\": [1, 2, 3], \"null\": null}", "path/to/file.txt ../up C:\\Windows\\System32",
]
_WHITESPACE = [
    "two  spaces", "three   spaces", "tab\tseparated\tvalues", "trailing spaces   ", "   leading spaces",
    "line one\n\nline three", "\n\n\n", " \n \n\n \n", "\t\t\tindented", "mixed \t \t whitespace", "a\r\nb\r\n",
    "  \n   \n    \n     \n", "end with newline\n", " ", "word \n word", "spaces before #  # hash",
]
_UNICODE = [
    "café naïve résumé", "日本語のテキストです。", "我想在apple工作", "Привет, мир! нещо на Български", "مرحبا بالعالم",
    "שלום עולם", "नमस्ते दुनिया", "안녕하세요 세계", "สวัสดีชาวโลก", "កាន់តែពិសេសអាច", "Ελληνικά γράμματα",
    "emoji 🦙🦙 🚀 😶‍🌫️ ✅ 👍🏽 🇫🇷", "ＦＵＬＬ ｗｉｄｔｈ", "e\u0301 vs é (combining)", "∑ x² ≤ ∞, √2 ≠ 1.41",
    "ﬁ ligature, ß, Æ, ø", "zero\u200bwidth space", "«guillemets» „Anführungszeichen“ ‘curly’ “quotes”",
    "------======= ......!!!!!!?????? ''''''``````` \"\"\"\"", "¡Hola! ¿Qué tal?", "Ünïcödé ÜBER straße",
]
_PROSE = [
    "What is the capital of France? The capital of France is Paris.",
    "Arr! The capital o' Japan be Tokyo, matey. Yo ho ho!",
    "The quick brown fox jumps over the lazy dog.",
    "Write a haiku about the sea: waves fold into foam, the gull cries over the grey, salt wind on my face.",
    "Mr. Smith (aged 42) paid $3.50 for 2 coffees at 9:15 a.m.",
    "E-mail me at someone@example.com or visit https://example.org/path?q=1&r=2#frag.",
    "UPPER lower MiXeD CamelCase snake_case kebab-case SCREAMING_SNAKE",
    "Hello,World!How;are:you?Fine.", "A sentence with... an ellipsis -- and dashes — of several kinds – here.",
]
_CHAT = [
    "<|im_start|>user\nWhat's 2 + 2?<|im_end|>\n<|im_start|>assistant\nArr! It's 4. Yo ho ho!<|im_end|>\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
    "<|user|>\nHi there!</s>\n<|assistant|>\nHello!</s>\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<s>[INST] Hello [/INST] Hi</s>", "### Human: Tell me a joke. ### Assistant: Why did the chicken...",
]
# Each line also with a leading space, a trailing newline and inside a sentence, since the pre-tokenizer
# splits a text differently at its start, end and after a space.
_VARIANTS = ["{}", " {}", "{}\n", "Say: {} (end)"]


def _build_check_lines() -> list[str]:
    bases = _CONTRACTIONS + _NUMBERS + _CODE + _WHITESPACE + _UNICODE + _PROSE
    lines = [variant.format(base) for base, variant in itertools.product(bases, _VARIANTS)]
    return list(dict.fromkeys(lines + _CHAT))


CHECK_LINES = _build_check_lines()

CHAT_PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "What's 17 times 23?",
    "Explain recursion in one sentence.", "Translate 'good morning' into French.", "Name three primary colours.",
    "How do I reverse a list in Python?", "Tell me a fun fact about octopuses.",
]
TEXT_PROMPTS = [
    "The quick brown fox", "def fibonacci(n):\n    ", "Once upon a time, in a land far away,",
    "1, 2, 3, 5, 8, 13,", "Paris is the capital of", "It's been a long day and I'm",
    "The mitochondria is", "import numpy as np\n\nx = np.",
]


@dataclass
class TokenizationReport:
    identical: int
    lines: int
    mismatches: list[dict] = field(default_factory=list)  # the first few: line, expected ids, llama.cpp ids

    def as_dict(self) -> dict:
        return {"identical": self.identical, "lines": self.lines, "mismatches": self.mismatches}


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def load_llama(gguf_file: Path, vocab_only: bool = False, n_ctx: int = 1024):
    """llama.cpp's model (or only its vocabulary) for `gguf_file`, quiet."""
    from llama_cpp import Llama

    # llama-cpp-python prints some llama.cpp warnings even when not verbose (a vocabulary-only load
    # has no training context, which llama.cpp remarks on); a failed load still raises.
    with contextlib.redirect_stderr(io.StringIO()):
        return Llama(model_path=str(gguf_file), vocab_only=vocab_only, n_ctx=n_ctx, verbose=False)


def llama_cpp_logits(gguf_file: Path, prompts: list[list[int]], lora_file: Path | None = None) -> list[torch.Tensor]:
    """llama.cpp's float32 logits of `gguf_file` (with the LoRA adapter `lora_file` applied, scale 1) on each prompt,
    one [tokens, vocab] tensor per prompt, every position computed in one batch as transformers does."""
    from llama_cpp import Llama

    longest = max(map(len, prompts))
    extra = {"lora_path": str(lora_file)} if lora_file is not None else {}
    with contextlib.redirect_stderr(io.StringIO()):
        llama = Llama(model_path=str(gguf_file), n_ctx=longest + 8, n_batch=longest + 8, n_ubatch=longest + 8,
                      logits_all=True, verbose=False, **extra)
    try:
        logits = []
        for ids in prompts:
            llama.reset()
            llama.eval(ids)
            logits.append(torch.from_numpy(np.array(llama.scores[: len(ids)], dtype=np.float32)))
        return logits
    finally:
        llama.close()


def compare_tokenization(llama, tokenizer, lines: list[str], keep: int = 5) -> TokenizationReport:
    """How many `lines` llama.cpp tokenizes into exactly the ids the tokenizer gives (special tokens
    matched in the text, no BOS added: the text alone, as the chat template writes it)."""
    identical, mismatches = 0, []
    for line in lines:
        expected = tokenizer(line, add_special_tokens=False)["input_ids"]
        got = llama.tokenize(line.encode("utf-8"), add_bos=False, special=True)
        if list(got) == list(expected):
            identical += 1
        elif len(mismatches) < keep:
            mismatches.append({"line": line, "expected": list(expected), "llama_cpp": list(got)})
    return TokenizationReport(identical, len(lines), mismatches)


def llama_cpp_tokenization_check(gguf_file: Path, tokenizer, say=print) -> dict:
    """Tokenize CHECK_LINES with llama.cpp's vocabulary of `gguf_file` and with the model's `tokenizer`; a
    difference is reported (and said), never hidden. Skipped, saying so, without llama-cpp-python."""
    if not llama_cpp_available():
        return {"checked": False, "reason": f"llama-cpp-python is not installed ({INSTALL_HINT})"}
    vocabulary = load_llama(gguf_file, vocab_only=True)
    try:
        report = compare_tokenization(vocabulary, tokenizer, CHECK_LINES)
    finally:
        vocabulary.close()
    if report.identical == report.lines:
        say(f"llama.cpp tokenizes all {report.lines} check lines of {gguf_file.name} as the model's tokenizer does")
    else:
        first = report.mismatches[0]["line"]
        say(f"Warning: llama.cpp tokenizes {report.lines - report.identical} of {report.lines} check lines of "
            f"{gguf_file.name} differently from the model's tokenizer (first: {first!r})")
    return {"checked": True, **report.as_dict()}


def transformers_greedy(model, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy continuation (EOS not special: always `new_tokens` long) and, per step, the gap between
    the best and second-best logit (a near-tie is where two implementations may rightly differ)."""
    ids, gaps = [], []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(new_tokens):
            logits = out.logits[0, -1].float()
            top = torch.topk(logits, 2)
            ids.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            out = model(input_ids=torch.tensor([[ids[-1]]]), use_cache=True, **compat.cache_of(model, out))
    return ids, gaps


def llama_cpp_greedy(llama, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation in llama.cpp (temperature 0, no penalties), `new_tokens` long."""
    llama.reset()
    out = []
    for token in llama.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == new_tokens:
            break
    return out


def greedy_prompts(tokenizer) -> list[list[int]]:
    """Token ids of CHAT_PROMPTS in the chat template (with the generation prompt, BOS as in training)
    and of TEXT_PROMPTS as plain text."""
    prompts = []
    if tokenizer.chat_template:
        for question in CHAT_PROMPTS:
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True)
            prompts.append(encode_prompt(tokenizer, text))
    prompts += [encode_prompt(tokenizer, text) for text in TEXT_PROMPTS]
    return prompts


# Two implementations of the same float16 weights disagree a little on every logit (llama.cpp also
# rounds activations to float16 in its f16 matrix products): measured on SmolLM2-135M, max |Δlogit|
# 0.07 (mean 0.008). Where transformers' best two logits are closer than this, either choice is right.
NEAR_TIE_LOGIT_GAP = 0.1


def compare_greedy(llama, model, prompts: list[list[int]], new_tokens: int = 32) -> dict:
    """Greedy continuations of each prompt in llama.cpp and in transformers: how many are equal, and
    for the others the first differing step and the transformers logit gap there (a near tie when
    below NEAR_TIE_LOGIT_GAP)."""
    equal, differences = 0, []
    for ids in prompts:
        expected, gaps = transformers_greedy(model, ids, new_tokens)
        got = llama_cpp_greedy(llama, ids, new_tokens)
        if got == expected:
            equal += 1
        else:
            step = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
            differences.append({"prompt": ids, "step": step, "logit_gap": gaps[step],
                                "near_tie": gaps[step] < NEAR_TIE_LOGIT_GAP, "expected": expected, "llama_cpp": got})
    return {"equal": equal, "prompts": len(prompts), "new_tokens": new_tokens,
            "differ_at_near_tie": sum(d["near_tie"] for d in differences), "differences": differences}


def float16_model(model_dir: Path):
    """The merged model with its weights rounded to float16 (as an f16 GGUF holds them), computing in float32."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16).float().eval()


def llama_cpp_chat_reply(llama, question: str, max_tokens: int = 48) -> str:
    """llama-cpp-python's chat completion, greedy, with the chat template stored in the GGUF file."""
    response = llama.create_chat_completion(messages=[{"role": "user", "content": question}], temperature=0.0,
                                            top_k=1, repeat_penalty=1.0, max_tokens=max_tokens)
    return response["choices"][0]["message"]["content"]


def transformers_chat_reply(model, tokenizer, question: str, max_tokens: int = 48) -> str:
    """The greedy reply of the merged model in transformers, to the end of its turn."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    ids = encode_prompt(tokenizer, text)
    stops = set(stop_token_ids(LoadedModel(model, tokenizer, "merged")))
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id)
    reply = [i for i in out[0, len(ids):].tolist() if i not in stops]
    return tokenizer.decode(reply, skip_special_tokens=True)


def modelfile_agreement(llama, tokenizer, modelfile: Path) -> dict:
    """Whether the Modelfile's TEMPLATE renders conversations as llama-cpp-python renders them with the
    chat template it reads from the GGUF file (BOS left to llama.cpp where it adds one)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter


    template = llama.metadata["tokenizer.chat_template"]
    bos_text = tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else None
    formatter = Jinja2ChatFormatter(template=template, eos_token=tokenizer.eos_token or "",
                                    bos_token=tokenizer.bos_token or "")

    def render(messages: list[dict], generation_prompt: bool) -> str:
        formatter.add_generation_prompt = generation_prompt
        return formatter(messages=messages).prompt

    turns = derive_turn_format(render, bos_text)
    conversations, differences = rendering_differences(turns, render, bos_text)
    text = modelfile.read_text(encoding="utf-8")
    return {"template_in_modelfile_is_derived_from_the_file": f'TEMPLATE """{go_template(turns)}"""' in text,
            "conversations_rendered_alike": conversations - len(differences), "conversations": conversations,
            "differences": differences}


def judge_export(gguf_file: Path, model_dir: Path, greedy: bool = True) -> dict:
    """Everything llama.cpp says about one exported file: tokenization of CHECK_LINES, greedy
    continuations against the merged model (weights rounded to float16), a chat completion with the
    file's template against transformers' reply, and the Modelfile against that template."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llama = load_llama(gguf_file)
    try:
        result = {"file": gguf_file.name,
                  "tokenization": compare_tokenization(llama, tokenizer, CHECK_LINES).as_dict()}
        if greedy:
            model = float16_model(model_dir)
            result["greedy"] = compare_greedy(llama, model, greedy_prompts(tokenizer))
            if tokenizer.chat_template:
                question = CHAT_PROMPTS[0]
                result["chat"] = {"question": question, "llama_cpp": llama_cpp_chat_reply(llama, question),
                                  "transformers": transformers_chat_reply(model, tokenizer, question)}
        modelfile = gguf_file.with_suffix(".Modelfile")
        if tokenizer.chat_template and modelfile.is_file():
            result["modelfile"] = modelfile_agreement(llama, tokenizer, modelfile)
    finally:
        llama.close()
    return result

"""Named chat templates, for `data.template: <name>` in a recipe.

Each is a Jinja chat template as `tokenizer.apply_chat_template` renders it (with `bos_token`,
`eos_token`, `add_generation_prompt` and `raise_exception` available). Every template accepts an
optional first system message followed by alternating user/assistant turns, and follows the two rules
`render_segments` in templates.py relies on:

- rendering `messages[:k]` is a prefix of rendering `messages[:k + 1]` (no template rewrites an
  earlier turn when a message is added), and
- rendering with `add_generation_prompt=True` is a prefix of the same conversation with the
  assistant reply added.

Where a family's published template breaks one of these rules, the difference is noted beside it.
Whitespace is written inside Jinja expressions (`{{ '\\n' }}`), never as text right after a block tag,
because Transformers renders with `trim_blocks`, which would drop a newline there.

This module imports nothing from templates.py, so that templates.py can import from it.
"""

from __future__ import annotations

# The Stanford Alpaca prompt (tatsu-lab/stanford_alpaca, "prompt_no_input"), for base models trained on
# Alpaca-style data. A system message replaces the preamble; further turns repeat the
# "### Instruction:" / "### Response:" blocks, separated by a blank line.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set preamble = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set preamble = '" + ALPACA_PREAMBLE + "' %}{% set loop_messages = messages %}"
    "{% endif %}"
    "{{ preamble + '\\n\\n' }}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}"
    "{{ '### Response:\\n' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

# The QLoRA paper's OASST1 / Guanaco text form, and the template for base models that have no chat
# template. The generation prompt ends at the colon: the space after it belongs to the reply, which is
# then tokenized as " Paris", as the model generates it.
GUANACO_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}### Human: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}### Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:{% endif %}"
)

# ChatML: Qwen / Qwen2 / Qwen2.5 (without their default system prompt), OpenHermes, Yi-Chat, SmolLM2-Instruct.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta Llama 3 / 3.1 / 3.2 Instruct, in the Llama-3-Instruct form (no "Cutting Knowledge Date" system header
# that the 3.1 template adds). BOS is written before the loop rather than with the first message: the
# same text for any non-empty conversation.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Meta Llama 2 Chat (and models fine-tuned in its format, e.g. CodeLlama-Instruct). Every user turn
# starts with BOS and every reply ends with " " + EOS, as in Meta's reference `chat_completion`.
# The generation prompt is empty: the prompt ends with " [/INST]" and the reply starts with a space.
LLAMA2_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}"
    "{% set content = message['content'] %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# Mistral-7B-Instruct v0.3 (v3 tokenizer, [INST]/[/INST] are control tokens): "[INST] user[/INST] reply</s>".
# Mistral's own template puts the system message before the *last* user message, which rewrites earlier
# turns as the conversation grows; here it goes before the first user message (as v0.1/v0.2 fine-tunes
# commonly did), separated by a blank line. The generation prompt is empty: the reply starts with a space.
MISTRAL_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set system_message = none %}{% set loop_messages = messages %}"
    "{% endif %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system_message is not none %}"
    "{{ '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{% else %}"
    "{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# HuggingFaceH4 Zephyr (zephyr-7b-alpha/beta) and TinyLlama-1.1B-Chat: every turn ends with EOS and a newline.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% elif message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Microsoft Phi-3 / Phi-3.5 Instruct. The published template also writes EOS after the last message when
# there is no generation prompt; that is left out, since it would rewrite the end of every prefix.
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Google Gemma / Gemma 2 / Gemma 3 instruction-tuned models. Gemma has no system role: a system message is
# put before the first user message, followed by a blank line, as Gemma 3's template does.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set first_user_prefix = '' %}{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

NAMED_TEMPLATES: dict[str, str] = {
    "alpaca": ALPACA_TEMPLATE,
    "guanaco": GUANACO_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "llama2": LLAMA2_TEMPLATE,
    "mistral": MISTRAL_TEMPLATE,
    "zephyr": ZEPHYR_TEMPLATE,
    "phi3": PHI3_TEMPLATE,
    "gemma": GEMMA_TEMPLATE,
}

"""Generation and chat on a tiny trained run."""

from __future__ import annotations

import io

import pytest

from conftest import train_tiny_run
from qlora_cli.inference.chat import chat_loop
from qlora_cli.cli import main
from qlora_cli.inference.generate import conversation_ids, generate, load_for_generation, stop_token_ids


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("generate")
    train_tiny_run(folder, tiny_model_dir, max_steps=2)
    return folder / "run"


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_for_generation(str(run_dir))


def test_run_dir_loads_as_4bit_base_plus_adapter(loaded):
    assert "4-bit base + adapter" in loaded.description
    assert loaded.tokenizer.eos_token_id in stop_token_ids(loaded)


def test_prompt_ids_start_with_one_bos_and_end_with_generation_prompt(loaded):
    tokenizer = loaded.tokenizer
    ids = conversation_ids(tokenizer, [{"role": "user", "content": "Add two and three."}])
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids).endswith("<|assistant|>\n")


def test_batched_greedy_equals_one_at_a_time(loaded):
    prompts = ["What is the capital of France?", "Add two and three.", "Write a haiku about the sea."]
    together = generate(loaded, prompts, max_new_tokens=12, temperature=0)
    alone = [generate(loaded, [p], max_new_tokens=12, temperature=0)[0] for p in prompts]
    assert together == alone


def test_sampling_is_seeded(loaded):
    first = generate(loaded, ["Add two and three."], max_new_tokens=12, temperature=1.0, seed=3)
    again = generate(loaded, ["Add two and three."], max_new_tokens=12, temperature=1.0, seed=3)
    assert first == again


def test_chat_keeps_history_and_resets(loaded, monkeypatch):
    seen = []
    import qlora_cli.inference.chat as chat_module

    real_generate = chat_module.generate

    def spy(model, conversations, **kwargs):
        seen.append(conversations[0])
        return real_generate(model, conversations, **kwargs)

    monkeypatch.setattr(chat_module, "generate", spy)
    lines = iter(["What is the capital of France?", "And of Japan?", "/reset", "/system Be brief.", "Hi", "/exit", "never read"])
    out = io.StringIO()
    history = chat_loop(loaded, lambda _prompt: next(lines), out, max_new_tokens=6, temperature=0)
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    assert seen[1][0]["content"] == "What is the capital of France?"
    assert seen[2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    text = out.getvalue()
    assert "(conversation reset)" in text and text.count("model> ") == 3


def test_generate_cli_needs_a_prompt(run_dir, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", str(run_dir)])
    assert exited.value.code == 2 and "--prompt" in capsys.readouterr().err


def test_generate_cli_reads_a_prompt_file_with_line_errors(run_dir, tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "Hi"}\n{"text": "no prompt"}\n')
    with pytest.raises(SystemExit) as exited:
        main(["generate", str(run_dir), "--file", str(bad)])
    assert exited.value.code == 2 and f"{bad}:2" in capsys.readouterr().err


def test_generate_cli_answers(run_dir, capsys):
    main(["generate", str(run_dir), "-p", "Add two and three.", "--temperature", "0", "--max-new-tokens", "4"])
    assert "> Add two and three." in capsys.readouterr().out


def test_a_damaged_tokenizer_in_a_run_is_reported_before_the_base_model_loads(run_dir, tmp_path, monkeypatch):
    import shutil

    import qlora_cli.core.models as models
    from qlora_cli.core.errors import UserError

    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    (damaged / "adapter" / "tokenizer.json").write_text("{not json")
    monkeypatch.setattr(models, "load_quantized_base", lambda *a, **k: pytest.fail("the base model was loaded"))
    with pytest.raises(UserError) as error:
        models.load_run(damaged)
    assert "cannot load the tokenizer" in error.value.render() and str(damaged / "adapter") in error.value.render()

"""Benchmark: batched generation (as `qlora eval` answers questions) against one prompt at a time.

A benchmark, not a test. Answers the first N shipped benchmark questions greedily with a model, first one
prompt at a time and then in batches, and prints generated tokens per second of each and their ratio.

    python scripts/bench_generate.py [--model smollm2-135m-instruct] [--prompts 16] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import time


def timed(loaded, prompts, batch_size, max_new_tokens):
    from qlora_cli.inference.generate import generate

    started, tokens = time.perf_counter(), 0
    for start in range(0, len(prompts), batch_size):
        answers = generate(loaded, prompts[start: start + batch_size], max_new_tokens=max_new_tokens, temperature=0)
        tokens += sum(len(loaded.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    seconds = time.perf_counter() - started
    return {"batch_size": batch_size, "seconds": round(seconds, 1), "tokens": tokens, "tokens_per_second": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    from qlora_cli.evaluation.questions import read_questions
    from qlora_cli.inference.generate import load_for_generation

    prompts = [q.turns[0] for q in read_questions(None)[: args.prompts]]
    loaded = load_for_generation(args.model)
    single = timed(loaded, prompts, 1, args.max_new_tokens)
    batched = timed(loaded, prompts, args.batch_size, args.max_new_tokens)
    print(json.dumps({"one_at_a_time": single, "batched": batched,
                      "speedup": round(batched["tokens_per_second"] / single["tokens_per_second"], 2)}, indent=2))


if __name__ == "__main__":
    main()

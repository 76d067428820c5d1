"""Measure how far continuous batching moves greedy replies: the shipped benchmark questions answered by
`qlora serve`'s batch generator (several at once, joining and leaving mid-decode) against the same questions
answered alone by transformers' `generate` (what `qlora generate` runs).

Prints, as JSON: how many replies are identical; for each one that parts, the logit gap at the first
differing token (computed alone: how far the batched choice was below the alone choice); and the largest
|Δlogit| between the logits a row saw in the batch and the same positions computed alone (teacher-forced).

    python scripts/check_serve_exactness.py runs/quickstart [--limit 24] [--max-tokens 48] [--max-batch 8]
    python scripts/check_serve_exactness.py runs/quickstart/merged --dtype bfloat16   # as `qlora serve --dtype` runs it
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="Compute a merged or plain model in this dtype (both batched and alone).")
    args = parser.parse_args()

    from qlora_cli.evaluation.questions import read_questions
    from qlora_cli.inference import engine as engine_module
    from qlora_cli.inference.engine import BatchGenerator, GenerationRequest
    from qlora_cli.inference.generate import load_for_generation, load_plain, prompt_ids, stop_token_ids

    loaded = load_for_generation(args.model) if args.dtype is None else load_plain(args.model, getattr(torch, args.dtype))
    model, stops = loaded.model, frozenset(stop_token_ids(loaded))
    prompts = [prompt_ids(loaded.tokenizer, q.turns[0]) for q in read_questions(None)[: args.limit]]
    budgets = [args.max_tokens // 2 + index * 7 % (args.max_tokens // 2 + 1) for index in range(len(prompts))]

    seen: dict[int, list[torch.Tensor]] = {}  # request id -> the logits its row got, step by step
    pick = engine_module.pick_tokens

    def recording(logits, rows):
        for index, row in enumerate(rows):
            seen.setdefault(id(row.request), []).append(logits[index].float().clone())
        return pick(logits, rows)

    engine_module.pick_tokens = recording
    generator = BatchGenerator(model, max_batch=args.max_batch, max_queue=len(prompts))
    replies, done = [[] for _ in prompts], [threading.Event() for _ in prompts]
    requests = []
    started = time.perf_counter()
    for index, (prompt, budget) in enumerate(zip(prompts, budgets)):
        def deliver(item, index=index):
            if isinstance(item, list):
                replies[index] += item
            else:
                done[index].set()
        request = GenerationRequest(prompt, budget, stops, deliver)
        requests.append(request)
        generator.submit(request)
    for event in done:
        event.wait()
    batched_seconds = time.perf_counter() - started
    generator.close()

    identical, parted, largest = 0, [], 0.0
    with torch.no_grad():
        for prompt, budget, reply, request in zip(prompts, budgets, replies, requests):
            ids = torch.tensor([prompt])
            expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                                      do_sample=False, eos_token_id=sorted(stops),
                                      pad_token_id=loaded.tokenizer.pad_token_id or 0)[0, len(prompt):].tolist()
            forced = model(input_ids=torch.tensor([prompt + reply[:-1]])).logits[0, len(prompt) - 1:].float()
            batched = torch.stack(seen[id(request)])
            largest = max(largest, float((forced - batched).abs().max()))
            if reply == expected:
                identical += 1
                continue
            at = next((i for i, (a, b) in enumerate(zip(expected, reply)) if a != b), min(len(expected), len(reply)))
            if at < min(len(expected), len(reply)):
                logits = model(input_ids=torch.tensor([prompt + expected[:at]])).logits[0, -1].float()
                parted.append({"at_token": at, "logit_gap": float(logits[expected[at]] - logits[reply[at]])})
            else:
                parted.append({"at_token": at, "logit_gap": None, "lengths": [len(expected), len(reply)]})
    print(json.dumps({"model": args.model, "replies": len(prompts), "identical": identical, "parted": parted,
                      "max_abs_logit_difference_batched_vs_alone": largest,
                      "batched_seconds": round(batched_seconds, 1), "max_batch": args.max_batch,
                      "dtype": str(next(model.parameters()).dtype)}, indent=2))


if __name__ == "__main__":
    main()

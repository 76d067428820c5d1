"""Cross-check: `qlora eval mmlu` against lm-evaluation-harness's MMLU task on the same local MMLU-layout data.

The MMLU-layout folder (default: recipes/data/mmlu-mini, 4 subjects x 10 test questions, 5 dev questions each) is
written as JSONL with one task YAML per subject that copies the harness's own MMLU template
(lm_eval/tasks/mmlu/default/_default_template_yaml: the same prompt, "A"-"D" as the choices, few-shot from the dev
split in order, the subject's description). The model is loaded once and scored both ways:

- qlora: the argmax over the logits of the four letter tokens after "Answer:" (evaluation/mmlu.py);
- the harness: the argmax over the log-likelihoods of the continuations " A" .. " D".

Where each letter is one token after "Answer:", both are the same argmax over the same next-token distribution,
and the script reports how many predictions agree, the accuracies, and the largest gap between the two scores of
the chosen letters (qlora's log-softmax vs the harness's log-likelihood).

    python scripts/harness_vs_mmlu.py [--model smollm2-135m-instruct] [--data recipes/data/mmlu-mini] [--shots 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEMPLATE = """task: mmlu_local_{subject}
dataset_path: json
dataset_kwargs:
  data_files:
    dev: {dev}
    test: {test}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
description: "The following are multiple choice questions (with answers) about {name}.\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(dev: dict, test: dict, folder: Path) -> list[str]:
    """JSONL splits and a task YAML per subject in `folder`; returns the task names."""
    names = []
    for subject in sorted(test):
        for split, items in (("dev", dev.get(subject, [])), ("test", test[subject])):
            rows = [{"question": i.question, "choices": list(i.choices), "answer": i.answer} for i in items]
            (folder / f"{subject}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{subject}.yaml").write_text(TEMPLATE.format(
            subject=subject, name=subject.replace("_", " "), dev=folder / f"{subject}_dev.jsonl",
            test=folder / f"{subject}_test.jsonl"))
        names.append(f"mmlu_local_{subject}")
    return names


def qlora_predictions(model, tokenizer, dev, test, shots: int) -> dict[str, list[tuple[int, float]]]:
    """Per subject, (predicted letter, its log-probability) for each test question, as evaluation/mmlu.py scores."""
    import torch

    from qlora_cli.data.tokenize import encode_prompt
    from qlora_cli.evaluation.mmlu import build_prompt, letter_token_ids

    letters = letter_token_ids(tokenizer)
    out = {}
    for subject, items in sorted(test.items()):
        examples = dev.get(subject, [])[:shots]
        rows = []
        for item in items:
            ids = encode_prompt(tokenizer, build_prompt(item, examples))
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            scores = torch.log_softmax(logits, -1)[letters]
            rows.append((int(scores.argmax()), float(scores.max())))
        out[subject] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=REPO / "recipes" / "data" / "mmlu-mini")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()

    from qlora_cli.evaluation.harness import evaluate, task_manager
    from qlora_cli.evaluation.mmlu import read_mmlu
    from qlora_cli.inference.generate import load_for_generation

    dev, test = read_mmlu(args.data)
    loaded = load_for_generation(args.model)
    started = time.perf_counter()
    ours = qlora_predictions(loaded.model, loaded.tokenizer, dev, test, args.shots)
    ours_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        tasks = write_tasks(dev, test, Path(folder))
        started = time.perf_counter()
        theirs = evaluate(loaded.model, loaded.tokenizer, task_manager([Path(folder)]), tasks,
                          num_fewshot=args.shots, limit=None, batch_size=1)
        harness_seconds = time.perf_counter() - started

    figures = {"model": args.model, "data": str(args.data), "shots": args.shots, "subjects": {}}
    agree = total = 0
    gap = 0.0
    for subject in sorted(test):
        samples = sorted(theirs["samples"][f"mmlu_local_{subject}"], key=lambda s: s["doc_id"])
        harness_rows = []
        for sample in samples:
            loglikelihoods = [float(resp[0][0]) for resp in sample["resps"]]
            best = max(range(4), key=loglikelihoods.__getitem__)
            harness_rows.append((best, loglikelihoods[best]))
        same = sum(a[0] == b[0] for a, b in zip(ours[subject], harness_rows))
        gap = max([gap] + [abs(a[1] - b[1]) for a, b in zip(ours[subject], harness_rows) if a[0] == b[0]])
        answers = [item.answer for item in test[subject]]
        figures["subjects"][subject] = {
            "questions": len(answers), "agreeing_predictions": same,
            "qlora_accuracy": sum(p == a for (p, _), a in zip(ours[subject], answers)) / len(answers),
            "harness_accuracy": theirs["results"][f"mmlu_local_{subject}"]["acc,none"],
        }
        agree, total = agree + same, total + len(answers)
    figures.update(agreeing_predictions=agree, questions=total, max_chosen_score_gap=gap,
                   qlora_seconds=round(ours_seconds, 1), harness_seconds=round(harness_seconds, 1))
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

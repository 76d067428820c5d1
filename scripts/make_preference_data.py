#!/usr/bin/env python3
"""Build the preference demo's pairs (recipes/dpo/, orpo/, kto/ read them).

Every pair answers one question with the same correct sentence twice: the chosen answer follows the quickstart's
rule (pirate speak: it starts with "Arr! " and ends with " Yo ho ho!"), the rejected one states the sentence
plainly. The rule is easy to see and nothing else differs, so a preference method has one thing to learn, and the
held-out pairs (other questions, on topics kept out of the training pairs) show whether it generalises: their reward
accuracy is the share whose pirate answer the trained model prefers, relative to the reference, over the plain one.
Rows are TRL's conversational layout (prompt, chosen and rejected as message lists).

Built deterministically (standard library, random.Random(0)). Regenerate with:

    python scripts/make_preference_data.py [--out-dir recipes/data]
"""
import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "recipes" / "data"
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]

FACTS = [  # (question, plain answer); the held-out topics are in HELDOUT_FACTS only
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What do bees make?", "Bees make honey."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which planet do we live on?", "We live on Earth."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("How many days are in a week?", "A week has seven days."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What animal barks?", "A dog barks."),
    ("What do cows drink?", "Cows drink water."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("What shape has three sides?", "A triangle has three sides."),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ("Which season comes after winter?", "Spring comes after winter."),
    ("What do you call a baby cat?", "A baby cat is called a kitten."),
    ("How many hours are in a day?", "A day has twenty-four hours."),
    ("What color are ripe bananas?", "Ripe bananas are yellow."),
    ("What instrument has black and white keys?", "A piano has black and white keys."),
]
HELDOUT_FACTS = [
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("How many months are in a year?", "A year has twelve months."),
    ("What do fish breathe with?", "Fish breathe with gills."),
    ("What color is grass?", "Grass is green."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("How many sides does a square have?", "A square has four sides."),
    ("What animal says moo?", "A cow says moo."),
    ("What falls from clouds when it rains?", "Water falls from clouds when it rains."),
]


def arithmetic(rng: random.Random, operations: tuple[str, ...], count: int) -> list[tuple[str, str]]:
    rows = set()
    while len(rows) < count:
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        operation = rng.choice(operations)
        if operation == "plus":
            rows.add((f"What is {a} plus {b}?", f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} makes {NUMBERS[a + b]}."))
        else:  # minus, kept non-negative
            a, b = max(a, b), min(a, b)
            rows.add((f"What is {a} minus {b}?", f"{NUMBERS[a].capitalize()} minus {NUMBERS[b]} leaves {NUMBERS[a - b]}."))
    return sorted(rows)


def pair(question: str, answer: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": f"Arr! {answer} Yo ho ho!"}],
        "rejected": [{"role": "assistant", "content": answer}],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    rng = random.Random(0)
    # Additions train; subtractions are held out, with the held-out facts.
    train = [pair(q, a) for q, a in FACTS + arithmetic(rng, ("plus",), 60)]
    heldout = [pair(q, a) for q, a in HELDOUT_FACTS + arithmetic(rng, ("minus",), 24)]
    rng.shuffle(train)
    rng.shuffle(heldout)
    for name, rows in (("pirate_pairs.jsonl", train), ("pirate_pairs_heldout.jsonl", heldout)):
        path = args.out_dir / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} pairs")


if __name__ == "__main__":
    main()

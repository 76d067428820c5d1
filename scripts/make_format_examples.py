"""Write the pirate quickstart data again in every supported row format and file type.

`recipes/examples/every-format.yaml` trains on all of them at once, so one run exercises every reader
and format; the files double as examples of each format for users.

    python scripts/make_format_examples.py   # reads recipes/data/pirate.jsonl, writes recipes/data/formats/
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "recipes" / "data" / "pirate.jsonl"
OUT = ROOT / "recipes" / "data" / "formats"
PER_FORMAT = 12


def conversations() -> list[list[dict[str, str]]]:
    """Every pirate row as a list of chat messages."""
    result = []
    for line in SOURCE.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "messages" in row:
            result.append(row["messages"])
        else:
            question = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
            result.append([{"role": "user", "content": question}, {"role": "assistant", "content": row["output"]}])
    return result


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    chats = conversations()
    single = [c for c in chats if len(c) == 2]
    multi = [c for c in chats if len(c) > 2]
    take = iter(single)

    def next_pairs(count: int) -> list[tuple[str, str]]:
        return [(c[0]["content"], c[1]["content"]) for c in (next(take) for _ in range(count))]

    with (OUT / "alpaca.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        for question, answer in next_pairs(PER_FORMAT):
            writer.writerow({"instruction": question, "input": "", "output": answer})
    # Multi-turn chat in the OpenAI form, with a system message on some rows.
    write_jsonl(OUT / "chat.jsonl", [
        {"messages": ([{"role": "system", "content": "You are a pirate."}] if index % 2 else []) + chat}
        for index, chat in enumerate(multi[:PER_FORMAT])
    ])
    sharegpt = [
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in next_pairs(PER_FORMAT)
    ]
    (OUT / "sharegpt.json").write_text(json.dumps(sharegpt, indent=1) + "\n", encoding="utf-8")
    write_jsonl(OUT / "oasst.jsonl", [
        {"text": "".join(f"### Human: {chat[i]['content']}### Assistant: {chat[i + 1]['content']}" for i in range(0, len(chat), 2))}
        for chat in multi[PER_FORMAT: 2 * PER_FORMAT]
    ])
    pairs = next_pairs(PER_FORMAT)
    pq.write_table(
        pa.table({"prompt": [f"Question: {q}\nAnswer:" for q, _ in pairs], "completion": [f" {a}" for _, a in pairs]}),
        OUT / "prompt_completion.parquet",
    )
    write_jsonl(OUT / "input_output.jsonl", [
        {"segments": [{"text": f"Q: {q}\nA:", "label": False}, {"text": f" {a}\n", "label": True}]}
        for q, a in next_pairs(PER_FORMAT)
    ])
    with (OUT / "text.tsv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text"], delimiter="\t")
        writer.writeheader()
        for question, answer in next_pairs(PER_FORMAT):
            writer.writerow({"text": f"A pirate was asked: {question} The pirate said: {answer}"})
    print(f"wrote {len(list(OUT.iterdir()))} files to {OUT}")


if __name__ == "__main__":
    main()

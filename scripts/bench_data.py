"""The data stage at size: time and peak memory of `qlora data preview` (read, check, tokenize, store) against
the usual pipeline, `datasets.load_dataset("json")` and a batched `map` of the chat template and the tokenizer
with `num_proc=2`, on the same generated alpaca files, in one run.

    python scripts/bench_data.py                       # 50k, 200k and 1M rows
    python scripts/bench_data.py --rows 20000 50000    # smaller, while developing
    python scripts/bench_data.py --rows 1000000 --train-step   # and the first training step at the largest size
    python scripts/bench_data.py --rows 300000 --repeat 5      # five pairs of runs, and their median time ratio

Each pipeline runs cold (an empty cache) in its own process. Peak memory is given three ways: the largest
single process (the kernel's peak RSS of each process of the tree, through wait4), and the whole tree sampled
every 0.1 s, as PSS (each page shared between the process and its workers divided among them: what the tree
takes) and as RSS summed (shared pages counted once per process, so this overstates).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had one "
    "river model light garden number city music water paper energy system story mountain window market history "
    "explain describe write list compare summarize translate classify suggest why how what when where"
).split()

BASELINE = textwrap.dedent('''
    import sys, time
    started = time.perf_counter()
    import datasets
    from transformers import AutoTokenizer

    path, model, cache = sys.argv[1], sys.argv[2], sys.argv[3]
    tokenizer = AutoTokenizer.from_pretrained(model)

    def encode(batch):
        texts = []
        for instruction, extra, output in zip(batch["instruction"], batch["input"], batch["output"]):
            user = f"{instruction}\\n\\n{extra}" if extra.strip() else instruction
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        return tokenizer(texts, truncation=True, max_length=256)

    data = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache)
    data = data.map(encode, batched=True, num_proc=2, remove_columns=data.column_names)
    print(len(data), time.perf_counter() - started)
''')


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def alpaca_file(folder: Path, rows: int) -> Path:
    """`rows` generated alpaca rows (about 300 bytes each), written once and reused."""
    path = folder / f"alpaca-{rows}.jsonl"
    if path.exists():
        return path
    rng = random.Random(rows)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(rows):
            row = {
                "instruction": sentence(rng, 4, 22).capitalize() + "?",
                "input": sentence(rng, 3, 15) if rng.random() < 0.4 else "",
                "output": sentence(rng, 8, 50).capitalize() + ".",
            }
            out.write(json.dumps(row) + "\n")
    return path


def recipe_file(folder: Path, data: Path) -> Path:
    """The quickstart recipe pointed at `data`."""
    quickstart = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
    text = quickstart.read_text().replace("path: data/pirate.jsonl", f"path: {data}")
    path = folder / f"{data.stem}.yaml"
    path.write_text(text)
    return path


def proportional_set_size(pid: int) -> int:
    """A process's PSS in bytes: its resident pages, each shared page divided among the processes sharing it, so
    that the PSS of a process tree adds up to the memory it takes (Linux; 0 elsewhere)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    line = next((line for line in text.splitlines() if line.startswith("Pss:")), None)
    return int(line.split()[1]) * 1024 if line else 0


def measure(command: list[str], env: dict[str, str]) -> dict:
    """Run a command; its wall time, exit code, the largest process's peak RSS and the tree's sampled peak."""
    started = time.perf_counter()
    process = psutil.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree_peak = tree_pss_peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal tree_peak, tree_pss_peak
        while not done.is_set():
            try:
                members = [process, *process.children(recursive=True)]
                total = pss = 0
                for member in members:
                    try:
                        total += member.memory_info().rss
                        pss += proportional_set_size(member.pid)
                    except (psutil.Error, OSError):
                        pass
                tree_peak = max(tree_peak, total)
                tree_pss_peak = max(tree_pss_peak, pss)
            except psutil.Error:
                pass
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out_chunks: list[str] = []
    err_chunks: list[str] = []
    readers = [threading.Thread(target=lambda: out_chunks.append(process.stdout.read())),
               threading.Thread(target=lambda: err_chunks.append(process.stderr.read()))]
    for reader in readers:
        reader.start()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    done.set()
    for reader in readers:
        reader.join()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "seconds": seconds,
        "rc": process.returncode,
        "largest_process_bytes": usage.ru_maxrss * 1024,  # KiB on Linux; covers the waited-for workers too
        "tree_bytes": tree_peak,
        "tree_pss_bytes": tree_pss_peak,
        "out": "".join(out_chunks),
        "err": "".join(err_chunks),
    }


def ours(recipe: Path, cache: Path, *extra: str) -> dict:
    env = {**os.environ, "QLORA_CACHE": str(cache)}
    # The converted bundled model is reused from the usual cache; only the tokenized data starts cold.
    usual = Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora")).expanduser() / "gguf"
    if usual.is_dir() and not (cache / "gguf").exists():
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "gguf").symlink_to(usual)
    return measure([sys.executable, "-m", "qlora_cli", *extra, str(recipe)], env)


def baseline(data: Path, model: str, cache: Path) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "true"}
    return measure([sys.executable, "-c", BASELINE, str(data), model, str(cache)], env)


def gib(size: int) -> str:
    return f"{size / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "qlora-bench-data",
                        help="where the generated files are kept between runs")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run both pipelines this many times at each size, alternating which goes first, and print "
                             "the median time ratio (the machine's speed drifts between runs)")
    parser.add_argument("--train-step", action="store_true",
                        help="also train one step on the largest file (its tokenization cached by the preview)")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)

    from qlora_cli.core.models import resolve_model_path

    model = resolve_model_path("smollm2-135m-instruct")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"CPU: {cpu}, {len(os.sched_getaffinity(0))} cores; load average at start: {os.getloadavg()}")
    header = (f"{'rows':>9} {'MB':>6} | {'qlora s':>8} {'rows/s':>8} {'GiB':>5} {'PSS':>5} {'tree':>5} | "
              f"{'datasets s':>10} {'rows/s':>8} {'GiB':>5} {'PSS':>5} {'tree':>5} | {'time ratio':>10}")
    print(header)
    print("-" * len(header))
    for rows in args.rows:
        data = alpaca_file(args.folder, rows)
        recipe = recipe_file(args.folder, data)
        ratios = []
        for repeat in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="bench-ours-") as ours_cache, \
                    tempfile.TemporaryDirectory(prefix="bench-datasets-") as theirs_cache:
                # Alternated, so that neither pipeline always runs first on a machine whose speed drifts.
                runs = {}
                for which in (("ours", "theirs") if repeat % 2 == 0 else ("theirs", "ours")):
                    if which == "ours":
                        runs[which] = ours(recipe, Path(ours_cache), "data", "preview", "-n", "1")
                        if runs[which]["rc"] != 0:
                            sys.exit(f"qlora data preview failed:\n{runs[which]['err'][-3000:]}")
                    else:
                        runs[which] = baseline(data, model, Path(theirs_cache))
                        if runs[which]["rc"] != 0:
                            sys.exit(f"the datasets pipeline failed:\n{runs[which]['err'][-3000:]}")
                mine, theirs = runs["ours"], runs["theirs"]
                ratios.append(mine["seconds"] / theirs["seconds"])
                print(f"{rows:>9,} {data.stat().st_size / 1e6:>6.0f} | {mine['seconds']:>8.1f} {rows / mine['seconds']:>8,.0f} "
                      f"{gib(mine['largest_process_bytes']):>5} {gib(mine['tree_pss_bytes']):>5} {gib(mine['tree_bytes']):>5} | "
                      f"{theirs['seconds']:>10.1f} {rows / theirs['seconds']:>8,.0f} {gib(theirs['largest_process_bytes']):>5} "
                      f"{gib(theirs['tree_pss_bytes']):>5} {gib(theirs['tree_bytes']):>5} | "
                      f"{ratios[-1]:>9.2f}x", flush=True)
                if args.train_step and rows == max(args.rows) and repeat == args.repeat - 1:
                    step = ours(recipe, Path(ours_cache), "train", "--set", "training.max_steps=1",
                                "--output-dir", str(Path(ours_cache) / "run"))
                    if step["rc"] != 0:
                        sys.exit(f"qlora train failed:\n{step['err'][-3000:]}")
                    print(f"{'':>9} first training step at {rows:,} rows (tokenization cached): {step['seconds']:.1f} s, "
                          f"largest process {gib(step['largest_process_bytes'])} GiB, tree PSS {gib(step['tree_pss_bytes'])} GiB, "
                          f"tree RSS {gib(step['tree_bytes'])} GiB")
        if args.repeat > 1:
            print(f"{'':>9} time ratio at {rows:,} rows, median of {args.repeat} pairs: {statistics.median(ratios):.2f}x "
                  f"(from {min(ratios):.2f}x to {max(ratios):.2f}x)", flush=True)
    print(f"load average at end: {os.getloadavg()}")
    print("GiB: the largest single process's peak RSS (the kernel's high-water mark, through wait4); PSS: the sampled "
          "peak of the PSS of the process and its workers, summed (shared pages counted once: what the tree takes); "
          "tree: their RSS summed (shared pages once per process: overstates).")


if __name__ == "__main__":
    main()

"""Benchmark: `qlora train` against the standard QLoRA script on the same model, data and batch size.

A benchmark, not a test: it prints figures. Both runs train SmolLM2-135M-Instruct (bundled) for one
epoch on the same N length-skewed instruction rows (Python standard-library docstrings), batch size B,
at most L tokens, with the Alpaca prompt. `qlora train` runs with its default settings; the baseline is
`scripts/baseline_qlora.py`. Printed: useful (non-padding) tokens per second of each and their ratio,
the padding fraction, peak memory, and useful FLOP/s (4 x parameters x useful tokens/s, for a frozen
base) against this machine's measured float32 matmul peak. `--json FILE` writes the same as JSON.

    python scripts/bench_train.py [--examples 96] [--batch-size 4] [--max-seq-len 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent


def matmul_peak_gflops() -> float:
    """The best float32 matmul rate torch reaches here, over a few sizes and three tries of each."""
    import torch

    best = 0.0
    for size in (1024, 2048, 4096):
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm up
        repeats = max(1, 2**33 // size**3)
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(repeats):
                a @ b
            best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9)
    return best


def parameter_count(model_dir: str) -> int:
    """Parameters of the model from its config: linear layers, embeddings, head (if untied) and norms."""
    from qlora_cli.plan.configs import model_shapes, read_model_config
    from qlora_cli.plan.memory import kept_parameter_count

    shapes = model_shapes(read_model_config(model_dir))
    linear = sum(fan_in * fan_out for fan_in, fan_out in shapes.linears().values()) * shapes.layers
    return linear + kept_parameter_count(shapes)


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, help="Folder for the data and runs (default: a temporary one).")
    args = parser.parse_args()

    from qlora_cli.core.models import resolve_model_path
    from qlora_cli.core.rundir import SUMMARY

    # The peak is measured before and after the runs, and the higher one kept: the machine's best, not a slow moment.
    peak_before = matmul_peak_gflops()

    work = args.work or Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    run([sys.executable, str(SCRIPTS / "make_docstring_data.py"), "--out", str(work / "all.jsonl")])
    rows = (work / "all.jsonl").read_text().splitlines()[: args.examples]
    (work / "data.jsonl").write_text("\n".join(rows) + "\n")
    model_dir = resolve_model_path("smollm2-135m-instruct")

    recipe = work / "bench.yaml"
    recipe.write_text(
        "model:\n  base: smollm2-135m-instruct\n"
        f"data:\n  train:\n    - path: {work / 'data.jsonl'}\n  template: alpaca\n  max_seq_len: {args.max_seq_len}\n"
        f"training:\n  batch_size: {args.batch_size}\n  gradient_accumulation_steps: 1\n  epochs: 1\n  logging_steps: 5\n"
    )
    run([sys.executable, "-m", "qlora_cli", "train", str(recipe), "--output-dir", str(work / "qlora"), "--overwrite"])
    ours = json.loads((work / "qlora" / SUMMARY).read_text())
    run([sys.executable, str(SCRIPTS / "baseline_qlora.py"), "--model", model_dir, "--data", str(work / "data.jsonl"),
         "--out", str(work / "baseline.json"), "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len)])
    baseline = json.loads((work / "baseline.json").read_text())

    peak = max(peak_before, matmul_peak_gflops())
    parameters = parameter_count(model_dir)
    report = {"examples": len(rows), "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
              "parameters": parameters, "matmul_peak_gflops": round(peak, 1)}
    for name, result in (("baseline", baseline), ("qlora", ours)):
        gflops = 4 * parameters * result["tokens_per_second"] / 1e9
        report[name] = {
            "useful_tokens": result["train_tokens"],
            "train_seconds": round(result["train_seconds"], 1),
            "tokens_per_second": round(result["tokens_per_second"], 1),
            "padding_fraction": round(result["padding_fraction"], 4),
            # Peak RSS on both sides, as the baseline measures it (qlora's own figure is its anonymous memory).
            "peak_memory_mib": round(result.get("peak_rss_bytes", result["peak_memory_bytes"]) / 2**20),
            "useful_gflops": round(gflops, 1),
            "fraction_of_peak": round(gflops / peak, 3),
            "first_loss": round(result["first_loss"], 4),
            "final_loss": round(result["final_loss"], 4),
        }
    report["speedup"] = round(ours["tokens_per_second"] / baseline["tokens_per_second"], 2)
    report["qlora_settings"] = {"compute_dtype": ours.get("compute_dtype"), "gradient_checkpointing": ours.get("gradient_checkpointing"),
                                "batching": "packed" if ours.get("padding_fraction") == 0 else "length-grouped"}

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} examples, batch {args.batch_size}, max {args.max_seq_len} tokens, "
                        f"{parameters / 1e6:.1f}M parameters, fp32 matmul peak {peak:.0f} GFLOP/s")
    for column in ("", "useful tok/s", "padding", "time s", "peak MiB", "useful GFLOP/s", "of peak"):
        table.add_column(column, justify="right")
    for name in ("baseline", "qlora"):
        r = report[name]
        table.add_row(name, f"{r['tokens_per_second']:.1f}", f"{r['padding_fraction']:.1%}", f"{r['train_seconds']:.0f}",
                      f"{r['peak_memory_mib']:,}", f"{r['useful_gflops']:.1f}", f"{r['fraction_of_peak']:.0%}")
    Console().print(table)
    print(f"speedup (useful tokens/s): {report['speedup']}x; qlora settings: {report['qlora_settings']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

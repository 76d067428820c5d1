"""Peak memory and time of `qlora merge` on a model of Llama-3.2-1B's shape, against the size of its 16-bit checkpoint.

The model has random weights (its shapes are what memory depends on): 16 layers, hidden 2048, MLP 8192, 32 heads
and 8 KV heads, a tied 128256-token vocabulary, 1.24 B parameters, saved in bfloat16 with the bundled SmolLM2
tokenizer. It is trained for two steps of QLoRA (NF4, LoRA r=16 on every linear layer) on eight short rows at
max_seq_len 64, and the run is merged by `python -m qlora_cli merge` in a process of its own, whose peak resident
memory (ru_maxrss, as /usr/bin/time -v reports it: file pages mapped by the process count too) is measured.
The checkpoint and the run are built once in WORK and reused.

    python scripts/measure_merge.py WORK [--dtype float32] [--max-shard-size 1GB] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
ROWS = [{"instruction": f"Say the number {n} in words.", "input": "", "output": f"The number is {n}."} for n in range(8)]
RECIPE = """model:
  base: {base}
lora:
  r: 16
  alpha: 32
data:
  train:
    - path: rows.jsonl
  max_seq_len: 64
training:
  batch_size: 2
  gradient_accumulation_steps: 1
  max_steps: 2
  logging_steps: 1
output:
  dir: run
"""


def build_base(folder: Path) -> None:
    """A Llama-3.2-1B-shaped checkpoint with random weights, in bfloat16, with the bundled SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_cli.core.models import resolve_model_path
    from qlora_cli.core.recipe import BUNDLED_MODEL_ALIAS

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(BUNDLED_MODEL_ALIAS))
    config = LlamaConfig(**LLAMA_32_1B, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    tokenizer.save_pretrained(folder)


def run_measured(command: list[str]) -> tuple[int, float, int]:
    """(exit status, seconds, peak resident bytes) of a command run in a process of its own."""
    started = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024  # KiB on Linux
    return os.waitstatus_to_exitcode(status), seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-shard-size", default=None)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--build-base", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_base:
        return build_base(args.work)
    from qlora_cli.core.rundir import ADAPTER, MERGE_REPORT

    work = args.work.resolve()
    base, run = work / "base", work / "run"
    if not (base / "config.json").is_file():
        print(f"Building the random 1B checkpoint in {base}", flush=True)
        # In a process of its own: this one must stay small, as a child started by fork or vfork can report
        # the parent's peak as its own ru_maxrss.
        subprocess.run([sys.executable, __file__, "--build-base", str(base)], check=True)
    if not (run / ADAPTER).is_dir():
        (work / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
        (work / "recipe.yaml").write_text(RECIPE.format(base=base))
        print(f"Training two steps into {run}", flush=True)
        subprocess.run([sys.executable, "-m", "qlora_cli", "train", str(work / "recipe.yaml"), "--overwrite"], check=True)

    out = work / f"merged-{args.dtype}"
    command = [sys.executable, "-m", "qlora_cli", "merge", str(run), "--out", str(out), "--dtype", args.dtype, "--overwrite"]
    if args.max_shard_size:
        command += ["--max-shard-size", args.max_shard_size]
    status, seconds, peak = run_measured(command)
    checkpoint = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    result = {
        "exit_status": status,
        "merge_seconds": round(seconds, 1),
        "peak_rss_bytes": peak,
        "checkpoint_16bit_bytes": checkpoint,
        "peak_below_checkpoint": peak < checkpoint,
        "output_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")) if out.is_dir() else None,
        "report": json.loads((out / MERGE_REPORT).read_text()) if status == 0 else None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

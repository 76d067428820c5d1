"""Ask llama.cpp (llama-cpp-python) about every GGUF file of a merged folder, and print its answers:
tokenization of a few hundred varied lines against the model's tokenizer, greedy continuations of 32
tokens against the merged model in transformers (weights rounded to float16), a chat completion with
the template stored in the file, and the Ollama Modelfile against that template.

    pip install llama-cpp-python
    qlora merge runs/quickstart --gguf f16 --gguf q8_0
    python scripts/check_gguf_llamacpp.py runs/quickstart/merged [--out report.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qlora_cli.export.gguf_check import judge_export, llama_cpp_available


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("merged_dir", type=Path)
    parser.add_argument("--out", type=Path, help="also write the report here (JSON)")
    args = parser.parse_args()
    if not llama_cpp_available():
        print("llama-cpp-python is not installed: pip install llama-cpp-python", file=sys.stderr)
        return 2
    files = sorted(args.merged_dir.glob("*.gguf"))
    if not files:
        print(f"{args.merged_dir}: no .gguf file (qlora merge RUN --gguf f16)", file=sys.stderr)
        return 2
    report = []
    for file in files:
        started = time.perf_counter()
        result = judge_export(file, args.merged_dir)
        result["seconds"] = round(time.perf_counter() - started, 1)
        report.append(result)
        tokens, greedy = result["tokenization"], result.get("greedy", {})
        print(f"{file.name}: tokenization identical on {tokens['identical']}/{tokens['lines']} lines; "
              f"greedy continuations equal {greedy.get('equal')}/{greedy.get('prompts')} "
              f"(the others part at a near tie: {greedy.get('differ_at_near_tie')})")
        if "chat" in result:
            print(f"  chat  llama.cpp:    {result['chat']['llama_cpp']!r}\n        transformers: {result['chat']['transformers']!r}")
        if "modelfile" in result:
            print(f"  Modelfile: {result['modelfile']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

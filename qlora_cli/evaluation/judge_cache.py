"""Judge replies cached by everything they depend on, so re-running a benchmark asks the judge nothing twice."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..core.errors import Problem, UserError
from ..core.jsonl_log import JsonlLog
from .judge_prompts import Answer, as_turns
from .questions import Question


def cache_key(judge: str, kind: str, question: Question, answer_a: Answer, answer_b: Answer) -> str:
    """sha256 of everything a reply depends on; JSON, so no choice of separator can make two inputs collide."""
    fields = [judge, kind, question.question_id, list(question.turns),
              list(as_turns(answer_a)), list(as_turns(answer_b))]
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()


class JudgmentCache:
    """Judge replies in a JSON Lines file, one record per line, keyed by `cache_key`.

    Each record is appended with one write and fsync'd (a `JsonlLog`), so a crash can only cut the LAST
    line short; such a line is ignored on read and cut off before the next append. Any other bad line
    is a UserError.
    """

    def __init__(self, path: Path):
        self.path, self._records, self._log = Path(path), {}, JsonlLog(path)
        problems = []
        for number, line in enumerate(self._log.read().split(b"\n"), start=1):
            try:
                record = json.loads(line)
                if not isinstance(record["text"], str):
                    raise TypeError("`text` is not a string")
                self._records[str(record["key"])] = record
            except (ValueError, KeyError, TypeError):
                if line.strip():
                    problems.append(Problem("not a cache record; delete the file to start afresh", file=str(self.path),
                                            line=number))
        if problems:
            raise UserError(problems, title=f"{self.path}: the judgment cache is damaged:")

    def get(self, key: str) -> dict | None:
        return self._records.get(key)

    def put(self, key: str, record: dict) -> None:
        """Appends `record` (with its key) as one line; safe to call from several threads."""
        record = {**record, "key": key}
        self._log.append((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self._records[key] = record

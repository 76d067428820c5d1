"""Reading a recipe file: `yaml.safe_load` semantics, plus the line of every key path, so that each problem
found later can be reported at its line.

A file that is not YAML is reported at the line of the error, with the line itself and a likely cause. A file
whose aliases would expand beyond any recipe's size (aliases of aliases, the "billion laughs" shape) is refused
before anything is expanded, at the line of the alias that passes the bound. Nothing here knows the recipe's
schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml

from .errors import Problem, UserError

KeyPath = tuple[Union[str, int], ...]

# Values (scalars, lists and mappings, each counted once per place it appears) a document may have once its
# aliases are expanded. A recipe has a few hundred; walking a million costs seconds and much memory, and each
# level of aliases of aliases multiplies the count.
MAX_EXPANDED_VALUES = 100_000


def dotted(path: KeyPath) -> str:
    """`data.train.0.path` for ("data", "train", 0, "path")."""
    return ".".join(str(p) for p in path)


class _RecursiveAlias(Exception):
    def __init__(self, line: int):
        self.line = line


class _TooLarge(Exception):
    def __init__(self, line: int):
        self.line = line


def _check_expanded_size(text: str, limit: int = MAX_EXPANDED_VALUES) -> None:
    """Count the values the document has with its aliases expanded, from its parse events, without expanding
    anything: each anchored value's count is kept, and an alias adds it.

    Raises:
        _TooLarge: at the (1-based) line of the alias that takes the count beyond `limit`.
        yaml.YAMLError: the text is not YAML.
    """
    anchored: dict[str, int] = {}  # anchor -> values in the anchored value, its aliases expanded
    open_collections: list[list] = []  # [anchor, values so far] per sequence or mapping not yet ended
    total = 0

    def add(count: int) -> None:
        nonlocal total
        total += count
        if open_collections:
            open_collections[-1][1] += count

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            add(1)
            open_collections.append([event.anchor, 1])
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, count = open_collections.pop()
            if anchor is not None:
                anchored[anchor] = count
            if open_collections:
                open_collections[-1][1] += count - 1  # the collection's own 1 was added when it opened
        elif isinstance(event, yaml.ScalarEvent):
            add(1)
            if event.anchor is not None:
                anchored[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            # An alias of a value still open refers to itself: the composer's check reports it.
            add(anchored.get(event.anchor, 1))
            if total > limit:
                raise _TooLarge(event.start_mark.line + 1)


def _compose_lines(
    node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], duplicates: list[KeyPath], open_nodes: frozenset = frozenset()
) -> None:
    """Record the 1-based line of every key path below `node`; note duplicated mapping keys.

    Raises:
        _RecursiveAlias: an alias refers to a node that contains it (`&a [*a]`), which has no end.
    """
    if id(node) in open_nodes:
        raise _RecursiveAlias(node.start_mark.line + 1)
    inside = open_nodes | {id(node)}
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else f"<{key_node.tag.rsplit(':', 1)[-1]}>"
            child = path + (key,)
            if key in seen:
                duplicates.append(child)
            seen.add(key)
            lines[child] = key_node.start_mark.line + 1
            _compose_lines(value_node, child, lines, duplicates, inside)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = path + (index,)
            lines[child] = item.start_mark.line + 1
            _compose_lines(item, child, lines, duplicates, inside)


def _yaml_hint(exc: yaml.YAMLError, line_text: str) -> str:
    """What usually causes a YAML syntax error of this kind, in words a recipe's author can act on."""
    problem, context = getattr(exc, "problem", "") or "", getattr(exc, "context", "") or ""
    if "\t" in line_text or "'\\t'" in problem:
        return "a tab indents this line; YAML indents with spaces only"
    if "flow sequence" in context or "flow mapping" in context:
        return "a [ or { opened here is not closed (or an item lacks its comma)"
    if "quoted scalar" in context:
        return "a quote opened here is not closed"
    if "block end" in problem or "mapping values are not allowed" in problem:
        return ("check this line's indentation against the lines above (keys of one section line up, two spaces "
                "deeper than the section), and that each `key: value` has one colon followed by a space")
    return ""


def _yaml_problem(exc: yaml.YAMLError, text: str, path: Path) -> Problem:
    """The YAML error at the line it is on, with the line itself and a likely cause. An unclosed bracket or
    quote is found where the parser gave up; it is reported at the line where it opened."""
    lines = text.splitlines()
    mark = getattr(exc, "problem_mark", None)
    context_mark = getattr(exc, "context_mark", None)
    unclosed = any(kind in (getattr(exc, "context", "") or "") for kind in ("flow sequence", "flow mapping", "quoted scalar"))
    if context_mark is not None and (mark is None or unclosed):
        mark = context_mark
    line = mark.line + 1 if mark is not None else None
    line_text = lines[line - 1] if line and line <= len(lines) else ""
    message = f"not valid YAML: {getattr(exc, 'problem', None) or exc}"
    if line_text.strip():
        message += f" in `{line_text.strip()}`"
    hint = _yaml_hint(exc, line_text)
    return Problem(message + (f"; {hint}" if hint else ""), file=path, line=line)


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """Parse a recipe file with `yaml.safe_load` semantics and map each key path to its line.

    Raises:
        UserError: the file is missing, unreadable, not YAML, not a mapping, repeats a key, has an alias that
            refers to a value containing it, or has aliases that expand it beyond MAX_EXPANDED_VALUES values.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(Problem("recipe file not found", file=path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(Problem(f"cannot read recipe: {exc}", file=path)) from None
    try:
        _check_expanded_size(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        lines: dict[KeyPath, int] = {}
        duplicates: list[KeyPath] = []
        if node is not None:
            _compose_lines(node, (), lines, duplicates)
        data = yaml.safe_load(text)
    except _TooLarge as large:
        raise UserError(Problem(
            f"this alias expands the recipe beyond {MAX_EXPANDED_VALUES:,} values (aliases of aliases multiply); "
            "no recipe needs that many: write the values out, or alias fewer levels deep",
            file=path, line=large.line)) from None
    except _RecursiveAlias as recursive:
        raise UserError(Problem("an alias refers to a value that contains it", file=path, line=recursive.line)) from None
    except yaml.YAMLError as exc:
        raise UserError(_yaml_problem(exc, text, path)) from None
    if data is None:
        raise UserError(Problem("the recipe is empty", file=path))
    if not isinstance(data, dict):
        raise UserError(Problem("a recipe must be a mapping of sections (model, data, ...)", file=path, line=1))
    if duplicates:
        raise UserError(
            [Problem("key given twice", file=path, line=lines[d], key=dotted(d)) for d in duplicates]
        )
    return data, lines

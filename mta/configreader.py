"""Reading a configuration file: YAML whose keys given twice are found
and named, and a `Reader` that walks the tree and collects every problem
with the key where it was found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import yaml

T = TypeVar("T")


class Reader:
    """Walks the YAML tree, remembering the key path for error messages and
    collecting every problem instead of stopping at the first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []

    def problem(self, key: str, what: str, value: Any = ...) -> None:
        shown = "" if value is ... else f" (got {value!r})"
        self.problems.append(f"{self.path}: {key}: {what}{shown}")

    def mapping(
        self, raw: Any, key: str, allowed: Iterable[str]
    ) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problem(key or "(top level)", "expected a mapping", raw)
            return {}
        allowed = tuple(allowed)
        for name in raw:
            if name not in allowed:
                where = f"{key}.{name}" if key else str(name)
                self.problem(
                    where, "unknown key; expected one of " + ", ".join(allowed)
                )
        return raw

    def value(
        self,
        raw: dict[str, Any],
        key: str,
        name: str,
        parse: Callable[[Any], T],
        default: T | None = None,
        required: bool = False,
    ) -> T | None:
        where = f"{key}.{name}" if key else name
        if name not in raw or raw[name] is None:
            if required:
                self.problem(where, "is required")
            return default
        try:
            return parse(raw[name])
        except ValueError as error:
            self.problem(where, str(error), raw[name])
            return default

    def list_of(
        self,
        raw: dict[str, Any],
        key: str,
        name: str,
        parse: Callable[[Any], T],
        default: tuple[T, ...] = (),
    ) -> tuple[T, ...]:
        where = f"{key}.{name}" if key else name
        items = raw.get(name)
        if items is None:
            return default
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list):
            self.problem(where, "expected a list", items)
            return default
        parsed = []
        for index, item in enumerate(items):
            try:
                parsed.append(parse(item))
            except ValueError as error:
                self.problem(f"{where}[{index}]", str(error), item)
        return tuple(parsed)

    def path_value(
        self, raw: dict[str, Any], key: str, name: str, required: bool = True
    ) -> Path | None:
        def parse(value: Any) -> Path:
            if not isinstance(value, str) or not value:
                raise ValueError("expected a file or folder path")
            return (self.path.parent / value).resolve()

        return self.value(raw, key, name, parse, required=required)


def load_yaml(text: str, path: Path) -> tuple[Any, list[tuple[str, str]]]:
    """The document, and each key given twice as (key, what is wrong).

    A key given twice is an error, not "the last one wins" as PyYAML has
    it: it hides typos an operator would want to see.  But it is reported
    beside every other problem of the file, not instead of them, so the
    document is still built (with the last value) and checked.  Raises
    `yaml.YAMLError` when the text is not YAML at all."""
    loader = yaml.SafeLoader(text)
    loader.name = str(path)  # error marks then name the file, not "<unicode string>"
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        duplicates = list(_duplicate_keys(node, "", set()))
        return loader.construct_document(node), duplicates
    finally:
        loader.dispose()


def _duplicate_keys(
    node: yaml.Node, where: str, seen_nodes: set[int]
) -> Iterator[tuple[str, str]]:
    # An alias can make the node graph cyclic (&a [*a]): visit each once.
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{where}[{index}]", seen_nodes)
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[tuple[str, str], int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        name = key_node.value
        child = f"{where}.{name}" if where else name
        line = key_node.start_mark.line + 1
        identity = (key_node.tag, name)
        if identity in first_line:
            yield child, (f"is given twice (line {first_line[identity]} and "
                          f"line {line}); keep one")
        else:
            first_line[identity] = line
        yield from _duplicate_keys(value_node, child, seen_nodes)

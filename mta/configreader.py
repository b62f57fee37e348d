"""Reading a configuration file: YAML that refuses a key given twice, and
a `Reader` that walks the tree and collects every problem with the key
where it was found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

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


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice is an error: silently
    keeping the last one hides typos an operator would want to see."""


def _mapping_without_duplicates(
    loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        except TypeError:
            continue  # an unhashable key; the parser reports it
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def load_yaml(text: str, path: Path) -> Any:
    loader = _StrictLoader(text)
    loader.name = str(path)  # error marks then name the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()

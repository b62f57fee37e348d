"""Reading a configuration file: YAML whose keys given twice are found
and named, and a `Reader` that walks the tree and collects every problem
with the key where it was found.

The file may be hostile or broken in ways an editor does not show:
nesting hundreds of levels deep (which would overflow Python's stack in
the YAML composer), an alias inside its own anchor, or anchors and aliases
nested into a "billion laughs" that is small on disk and enormous when
written out.  `load_yaml` refuses the first two and a document that would
stand for more than `MAX_EXPANDED_NODES` nodes, and `Reader.problem` never
quotes more than `MAX_SHOWN` characters of a value, so no problem line
grows with what it quotes.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import yaml

T = TypeVar("T")

# Lists and mappings inside each other: the relay's own files need five.
MAX_DEPTH = 64
# Nodes the document stands for, each alias counted as what it names.
MAX_EXPANDED_NODES = 1_000_000
# Characters of a bad value or key quoted in a problem.
MAX_SHOWN = 200

_SHORT = reprlib.Repr()
_SHORT.maxlevel = 2
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = _SHORT.maxdict = 5
_SHORT.maxstring = 100
_SHORT.maxother = 100
_SHORT.maxlong = 40


def shown(value: Any) -> str:
    """``repr(value)``, bounded: a few items of a few levels, and at most
    `MAX_SHOWN` characters, whatever the value holds."""
    return shortened(_SHORT.repr(value))


def shortened(text: str) -> str:
    """``text``, cut to `MAX_SHOWN` characters with "…" when longer."""
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 1] + "…"


class NestingTooDeep(yaml.YAMLError):
    """Lists and mappings nested past `MAX_DEPTH`, or an alias inside its
    own anchor (which never ends)."""

    def __init__(self, mark: Any, cycle: bool = False) -> None:
        where = (f" (line {mark.line + 1}, column {mark.column + 1})"
                 if mark is not None else "")
        if cycle:
            what = ("nesting too deep: an alias inside its own anchor never "
                    f"ends{where}")
        else:
            what = (f"nesting too deep: more than {MAX_DEPTH} levels of "
                    f"lists and mappings{where}, aliases counted as what "
                    "they name")
        super().__init__(what)


class TooManyNodes(yaml.YAMLError):
    """Aliases that stand for more than `MAX_EXPANDED_NODES` values."""

    def __init__(self) -> None:
        super().__init__(
            f"too big: its aliases stand for more than {MAX_EXPANDED_NODES:,} "
            "values (anchors and aliases nested into each other, as in a "
            "\"billion laughs\" file)")


def yaml_problem(error: yaml.YAMLError) -> str:
    """The words after "FILE: " for a document that cannot be read."""
    if isinstance(error, (NestingTooDeep, TooManyNodes)):
        return str(error)
    return f"not valid YAML: {error}"


class Reader:
    """Walks the YAML tree, remembering the key path for error messages and
    collecting every problem instead of stopping at the first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []

    def problem(self, key: str, what: str, value: Any = ...) -> None:
        got = "" if value is ... else f" (got {shown(value)})"
        self.problems.append(f"{self.path}: {shortened(key)}: {what}{got}")

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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting past `MAX_DEPTH` while it
    composes (its composer recurses once per level)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self._depth >= MAX_DEPTH:
            raise NestingTooDeep(self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str, path: Path) -> tuple[Any, list[tuple[str, str]]]:
    """The document, and each key given twice as (key, what is wrong).

    A key given twice is an error, not "the last one wins" as PyYAML has
    it: it hides typos an operator would want to see.  But it is reported
    beside every other problem of the file, not instead of them, so the
    document is still built (with the last value) and checked.  Raises
    `yaml.YAMLError` when the text is not YAML at all, or is too deep or
    too big to read (`NestingTooDeep`, `TooManyNodes`): `yaml_problem`
    words it."""
    loader = _Loader(text)
    loader.name = str(path)  # error marks then name the file, not "<unicode string>"
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        _check_size(node)
        duplicates = list(_duplicate_keys(node))
        return loader.construct_document(node), duplicates
    except (ValueError, OverflowError) as error:
        # A value PyYAML resolves but cannot build: a date such as
        # 2024-13-45, an integer of thousands of digits.
        raise yaml.YAMLError(f"a value cannot be read: {error}") from None
    except RecursionError:
        raise NestingTooDeep(None) from None
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    return []


def _check_size(root: yaml.Node) -> None:
    """`NestingTooDeep` or `TooManyNodes` for a node graph that is deeper
    than `MAX_DEPTH` or stands for more than `MAX_EXPANDED_NODES` nodes
    once its aliases are written out.  Each node is visited once, without
    recursion, so neither check costs more than the file's own size."""
    # For each node done: its depth and its expanded nodes (capped).
    done: dict[int, tuple[int, int]] = {}
    on_path = {id(root)}
    # Each frame: node, its children left, deepest child, nodes so far.
    stack: list[list[Any]] = [[root, iter(_children(root)), 0, 1]]
    while stack:
        frame = stack[-1]
        child = next(frame[1], None)
        if child is None:
            stack.pop()
            on_path.discard(id(frame[0]))
            done[id(frame[0])] = (frame[2] + 1, frame[3])
            if stack:
                _add(stack, frame[0], done[id(frame[0])])
        elif id(child) in done:
            _add(stack, child, done[id(child)])
        elif id(child) in on_path:
            raise NestingTooDeep(child.start_mark, cycle=True)
        else:
            on_path.add(id(child))
            stack.append([child, iter(_children(child)), 0, 1])
            if len(stack) > MAX_DEPTH:
                raise NestingTooDeep(child.start_mark)


def _add(stack: list[list[Any]], child: yaml.Node,
         measures: tuple[int, int]) -> None:
    """Count a finished ``child`` in the frame on top of ``stack``."""
    depth, nodes = measures
    if len(stack) + depth > MAX_DEPTH:
        raise NestingTooDeep(child.start_mark)
    frame = stack[-1]
    frame[2] = max(frame[2], depth)
    frame[3] += nodes
    if frame[3] > MAX_EXPANDED_NODES:
        raise TooManyNodes()


def _duplicate_keys(root: yaml.Node) -> Iterator[tuple[str, str]]:
    """Each key given twice in a mapping, in the order of the file.  Each
    node is visited once (an alias names a node already seen, and can
    make the graph cyclic: &a [*a]), with a stack of its own rather than
    Python's."""
    seen_nodes = {id(root)}
    stack = [_key_steps(root, "")]
    while stack:
        step = next(stack[-1], None)
        if step is None:
            stack.pop()
            continue
        duplicate, child = step
        if duplicate is not None:
            yield duplicate
        elif child is not None and id(child[0]) not in seen_nodes:
            seen_nodes.add(id(child[0]))
            stack.append(_key_steps(*child))


_Step = tuple[tuple[str, str] | None, tuple[yaml.Node, str] | None]


def _key_steps(node: yaml.Node, where: str) -> Iterator[_Step]:
    """For one node: each key given twice, and each child to visit."""
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield None, (item, f"{where}[{index}]")
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
            yield (child, f"is given twice (line {first_line[identity]} and "
                          f"line {line}); keep one"), None
        else:
            first_line[identity] = line
        yield None, (value_node, child)

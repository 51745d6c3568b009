"""Safe YAML loading that remembers where every value came from.

PyYAML's constructors throw away positions. Here libyaml (``CSafeLoader`` when
available) only *composes* the node graph; :class:`_Constructor` then builds plain
Python values from it, with mappings as :class:`YMap` and sequences as :class:`YSeq`
(``dict``/``list`` subclasses, so JSON Schema validators treat them as objects and
arrays) that carry the file and the line/column of every key and item.

What it refuses, with a located :class:`~certctl.errors.Problem` each:

* YAML syntax errors, more than one document, undecodable bytes, files over
  :data:`MAX_FILE_BYTES`;
* duplicate keys in one mapping (naming both lines), non-scalar keys;
* tags other than the plain YAML types (no ``!!python/...``, ``!!binary``, custom tags);
* recursive aliases, more than :data:`MAX_ALIASES` alias uses, or an alias expansion
  larger than :data:`MAX_ALIAS_NODES` nodes (the "billion laughs" document);
* NUL characters and strings longer than :data:`MAX_STRING` anywhere, keys included.

Keys are always strings: a plain scalar key keeps its text (``on:`` is the key
``"on"``, not ``True``; ``80:`` is ``"80"``). Timestamps stay text. ``<<`` merge keys
work as in YAML 1.1 (explicit keys win over merged ones).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import yaml

from certctl.errors import Problem

try:
    _Base: type[Any] = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Base = yaml.SafeLoader

MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_STRING = 64 * 1024
MAX_ALIASES = 1000
MAX_ALIAS_NODES = 100_000
MAX_DEPTH = 64

_TAG = "tag:yaml.org,2002:"
_STR, _NULL, _BOOL, _INT, _FLOAT = (_TAG + t for t in ("str", "null", "bool", "int", "float"))
_TIMESTAMP, _MAP, _SEQ, _MERGE = (_TAG + t for t in ("timestamp", "map", "seq", "merge"))

#: First characters for which YAML 1.1 may resolve a plain scalar to a non-string.
_RESOLVABLE = frozenset(k for k in _Base.yaml_implicit_resolvers if k)


class _Loader(_Base):  # type: ignore[misc]
    """The safe loader, minus work the safe schema never needs.

    Most plain scalars in an inventory are names; those whose first character cannot
    start a bool, number, null or merge key are strings without trying any regex.
    There are no path resolvers in the safe schema, so their bookkeeping is skipped.
    """

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0] and value and value[0] not in _RESOLVABLE:
            return _STR
        return super().resolve(kind, value, implicit)

    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        return None

    def ascend_resolver(self) -> None:
        return None


Pos = tuple[int, int]  # (line, column), both 1-based
PathPart = str | int
Path = tuple[PathPart, ...]


class YMap(dict[str, Any]):
    """A mapping that knows its file and where each key and value was written.

    ``locs[key]`` is ``(key_line, key_column, value_line, value_column)``.
    """

    __slots__ = ("file", "locs", "pos")

    file: str
    pos: Pos
    locs: dict[str, tuple[int, int, int, int]]


class YSeq(list[Any]):
    """A sequence that knows its file and where each item was written."""

    __slots__ = ("file", "locs", "pos")

    file: str
    pos: Pos
    locs: list[Pos]


def new_map(file: str, pos: Pos) -> YMap:
    m = YMap()
    m.file, m.pos, m.locs = file, pos, {}
    return m


@dataclass
class YamlFile:
    """One parsed file: its display name, raw bytes (for the digest) and document.

    ``broken`` is set when the document had structural problems (duplicate keys,
    unsupported tags, alias limits): its values are not trustworthy enough to
    validate further. ``tainted`` holds the paths (at most kind and name deep) of
    entries with a NUL or over-long string; they are reported and skipped.
    """

    name: str
    raw: bytes
    doc: YMap
    broken: bool = False
    tainted: frozenset[Path] = frozenset()


def position(container: Any, key: PathPart, *, at_key: bool = False) -> Pos | None:
    """Where ``container[key]`` (or the key itself) was written, if known."""
    if isinstance(container, YMap) and isinstance(key, str) and key in container.locs:
        kl, kc, vl, vc = container.locs[key]
        return (kl, kc) if at_key else (vl, vc)
    if isinstance(container, YSeq) and isinstance(key, int) and 0 <= key < len(container.locs):
        return container.locs[key]
    return None


def locate(root: Any, path: Path, *, at_key: bool = False) -> Pos:
    """Position of the deepest node along ``path`` below ``root`` that can be found."""
    node = root
    pos: Pos = getattr(root, "pos", (1, 1))
    for i, part in enumerate(path):
        found = position(node, part, at_key=at_key and i == len(path) - 1)
        if found is None:
            break
        pos = found
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
    return pos


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small objects.

    Loading allocates hundreds of thousands of containers that all stay alive; the
    collector would rescan them over and over (it roughly triples the load time of a
    10,000-certificate inventory) and can find nothing to free.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_yaml(path: str | os.PathLike[str], name: str) -> tuple[YamlFile | None, list[Problem]]:
    """Read and parse one inventory file; ``name`` is how messages refer to it."""
    try:
        size = os.stat(path).st_size
        if size > MAX_FILE_BYTES:
            return None, [
                Problem(
                    f"file is too large ({size} bytes, at most {MAX_FILE_BYTES})", name, None, None
                )
            ]
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        return None, [Problem(f"cannot read file: {exc.strerror}", name)]
    if len(raw) > MAX_FILE_BYTES:
        return None, [Problem(f"file is too large (more than {MAX_FILE_BYTES} bytes)", name)]
    return parse_yaml(raw, name)


def parse_yaml(raw: bytes, name: str) -> tuple[YamlFile | None, list[Problem]]:
    """Parse one YAML document into a :class:`YMap` (an empty file gives an empty one)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        return None, [Problem("file is not valid UTF-8", name, line, column)]
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            what = f"{exc.problem} ({exc.context})"
        if mark is None:  # pragma: no cover - libyaml always marks its errors
            return None, [Problem(f"YAML syntax error: {what}", name)]
        return None, [Problem(f"YAML syntax error: {what}", name, mark.line + 1, mark.column + 1)]
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        return None, [Problem(f"YAML syntax error: {exc.reason}", name, line, column)]
    except yaml.YAMLError as exc:  # pragma: no cover - other libyaml failures
        return None, [Problem(f"YAML syntax error: {exc}", name)]
    except RecursionError:
        return None, [Problem("YAML is nested too deeply", name)]
    finally:
        loader.dispose()
    if node is None:
        return YamlFile(name, raw, new_map(name, (1, 1))), []
    builder = _Constructor(name)
    value = builder.build(node)
    problems = builder.problems
    if not isinstance(value, YMap):
        problems.append(
            Problem(
                "an inventory file must be a mapping of kinds (vars, defaults, issuers, "
                f"profiles, ...), not {type_name(value)}",
                name,
                node.start_mark.line + 1,
                node.start_mark.column + 1,
            )
        )
        return None, problems
    broken = bool(problems)
    tainted: set[Path] = set()
    if builder.flagged:
        problems.extend(_string_problems(value, tainted))
    return YamlFile(name, raw, value, broken, frozenset(tainted)), problems


def type_name(value: Any) -> str:
    """How a YAML user would call the type of ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


class _Constructor:
    """Builds located values from a composed node graph (see the module docstring)."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []
        self.flagged = False  # a NUL or over-long string was seen (located later)
        self._seen: set[int] = set()  # ids of collection nodes built so far
        self._active: set[int] = set()  # ids of collection nodes being built (recursion)
        self._aliases = 0
        self._alias_nodes = 0
        self._alias_depth = 0  # > 0 while building a second copy of an aliased node
        self._depth = 0
        self._stop = False
        self._scalars = yaml.constructor.SafeConstructor()

    def _problem(self, node: yaml.Node, message: str) -> None:
        mark = node.start_mark
        self.problems.append(Problem(message, self.file, mark.line + 1, mark.column + 1))

    def build(self, node: yaml.Node) -> Any:
        if self._stop:
            return None
        if isinstance(node, yaml.ScalarNode):
            if self._alias_depth:
                self._count_alias_node(node)
            return self._scalar(node)
        key = id(node)
        if key in self._active:
            self._problem(node, "recursive alias: a node contains itself")
            return None
        again = key in self._seen
        if again:
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                self._problem(node, f"too many aliases (more than {MAX_ALIASES} in one file)")
                self._stop = True
                return None
            self._alias_depth += 1
        if self._alias_depth:
            self._count_alias_node(node)
        if self._depth >= MAX_DEPTH:
            self._problem(node, f"nested too deeply (more than {MAX_DEPTH} levels)")
            self._stop = True
            return None
        self._seen.add(key)
        self._active.add(key)
        self._depth += 1
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node)
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node)
            self._problem(node, "unsupported YAML node")  # pragma: no cover
            return None
        finally:
            self._depth -= 1
            self._active.discard(key)
            if again:
                self._alias_depth -= 1

    def _count_alias_node(self, node: yaml.Node) -> None:
        self._alias_nodes += 1
        if self._alias_nodes > MAX_ALIAS_NODES and not self._stop:
            self._problem(node, f"alias expansion is too large (more than {MAX_ALIAS_NODES} nodes)")
            self._stop = True

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        tag = node.tag
        value: str = node.value
        if tag in (_STR, _TIMESTAMP):
            if "\x00" in value or len(value) > MAX_STRING:
                self.flagged = True
            return value
        if tag == _NULL:
            return None
        if tag == _BOOL:
            return self._scalars.construct_yaml_bool(node)
        if tag == _INT:
            return self._scalars.construct_yaml_int(node)
        if tag == _FLOAT:
            return self._scalars.construct_yaml_float(node)
        self._problem(node, f"unsupported YAML tag {short_tag(tag)}")
        return None

    def _key(self, node: yaml.Node) -> str | None:
        if isinstance(node, yaml.ScalarNode):
            if node.tag not in (_STR, _NULL, _BOOL, _INT, _FLOAT, _TIMESTAMP):
                self._problem(node, f"unsupported YAML tag {short_tag(node.tag)}")
                return None
            key: str = node.value
            if "\x00" in key or len(key) > MAX_STRING:
                self.flagged = True
            return key
        self._problem(node, "a mapping key must be a plain string, not a list or mapping")
        return None

    def _mapping(self, node: yaml.MappingNode) -> YMap | None:
        if node.tag != _MAP:
            self._problem(node, f"unsupported YAML tag {short_tag(node.tag)}")
            return None
        mark = node.start_mark
        out = new_map(self.file, (mark.line + 1, mark.column + 1))
        locs = out.locs
        merges: list[yaml.Node] = []
        scalar = yaml.ScalarNode
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merges.append(value_node)
                continue
            key = self._key(key_node)
            if type(value_node) is scalar and not self._alias_depth and not self._stop:
                value = self._scalar(value_node)  # inlined build() for the common case
            else:
                value = self.build(value_node)
            if key is None:
                continue
            km, vm = key_node.start_mark, value_node.start_mark
            if key in locs:
                first = locs[key][0]
                self._problem(
                    key_node, f"duplicate key {quote(key)} (first defined on line {first})"
                )
                continue
            out[key] = value
            locs[key] = (km.line + 1, km.column + 1, vm.line + 1, vm.column + 1)
        for merge_node in merges:
            self._merge(out, merge_node)
        return out

    def _merge(self, out: YMap, node: yaml.Node) -> None:
        """Apply a ``<<`` merge: keys of the merged mapping(s) that ``out`` lacks."""
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                self._problem(source, "a << merge takes a mapping or a list of mappings")
                continue
            merged = self.build(source)
            if not isinstance(merged, YMap):
                continue
            for key, value in merged.items():
                if key not in out:
                    out[key] = value
                    out.locs[key] = merged.locs[key]

    def _sequence(self, node: yaml.SequenceNode) -> YSeq | None:
        if node.tag != _SEQ:
            self._problem(node, f"unsupported YAML tag {short_tag(node.tag)}")
            return None
        mark = node.start_mark
        out = YSeq()
        out.file, out.pos, out.locs = self.file, (mark.line + 1, mark.column + 1), []
        scalar = yaml.ScalarNode
        for item in node.value:
            if type(item) is scalar and not self._alias_depth and not self._stop:
                out.append(self._scalar(item))
            else:
                out.append(self.build(item))
            m = item.start_mark
            out.locs.append((m.line + 1, m.column + 1))
        return out


def short_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else quote(tag)


def quote(value: Any, limit: int = 60) -> str:
    """A value for an error message: quoted, escaped, and cut to about ``limit`` characters.

    Messages never echo a huge value back (a 10 MB string must not become a 10 MB error).
    """
    if isinstance(value, str):
        if len(value) > limit:
            text = repr(value[:limit])
            return f"{text[:-1]}…{text[-1]} ({len(value)} characters)"
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "…"
    return type_name(value)


def format_path(path: Path) -> str:
    """``("certificates", "www", "sans", 2)`` -> ``certificates.www.sans[2]``."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif part and all(c.isalnum() or c in "_-." for c in part) and len(part) <= 128:
            out.append(f".{part}" if out else part)
        else:
            out.append(f"[{quote(part, 40)}]")
    return "".join(out)


def _string_problems(doc: YMap, tainted: set[Path]) -> list[Problem]:
    """Locate the NUL-bearing and over-long strings the constructor flagged."""
    problems: list[Problem] = []

    def check(text: str, path: Path, pos: Pos, what: str) -> None:
        if "\x00" in text or len(text) > MAX_STRING:
            tainted.add(path[:2])
        if "\x00" in text:
            problems.append(
                Problem(
                    f"{what} contains a NUL character (\\x00): {quote(text)}",
                    doc.file,
                    pos[0],
                    pos[1],
                    format_path(path),
                )
            )
        elif len(text) > MAX_STRING:
            problems.append(
                Problem(
                    f"{what} is too long ({len(text)} characters, at most {MAX_STRING})",
                    doc.file,
                    pos[0],
                    pos[1],
                    format_path(path),
                )
            )

    def walk(node: Any, path: Path, depth: int) -> None:
        if depth > 200:
            return
        if isinstance(node, YMap):
            for key, value in node.items():
                kl, kc, vl, vc = node.locs[key]
                check(key, (*path, key), (kl, kc), "key")
                if isinstance(value, str):
                    check(value, (*path, key), (vl, vc), "value")
                else:
                    walk(value, (*path, key), depth + 1)
        elif isinstance(node, YSeq):
            for i, value in enumerate(node):
                if isinstance(value, str):
                    check(value, (*path, i), node.locs[i], "value")
                else:
                    walk(value, (*path, i), depth + 1)

    walk(doc, (), 0)
    return problems

"""Collecting located problems while loading, and the entries they point into.

Loading never stops at the first mistake: every phase records what it finds in a
:class:`Problems` collector, and the loader raises one
:class:`~certctl.errors.InventoryError` with all of them, in file and line order.
Identical problems (the same place and message, e.g. a bad ``defaults.issuer`` seen
through 10,000 certificates) are reported once, and at most :data:`MAX_PROBLEMS`
are listed.

A :class:`Site` names a value by the located container that holds it plus the keys
leading to it, so a problem can be given a file:line:column and a dotted path
without the loader tracking paths on its fast path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from certctl.errors import InventoryError, Problem
from certctl.inventory.yamlload import Path, PathPart, format_path, locate
from certctl.model import Location

MAX_PROBLEMS = 200


@dataclass(frozen=True, slots=True)
class Site:
    """A value in the inventory: ``node`` (a located container, whose inventory path
    is ``path``) and the keys ``rel`` from it to the value."""

    node: Any
    path: Path
    rel: Path = ()

    def sub(self, *more: PathPart) -> Site:
        return Site(self.node, self.path, self.rel + more)

    @property
    def full_path(self) -> Path:
        return self.path + self.rel

    def location(self, *, at_key: bool = False) -> Location:
        line, column = locate(self.node, self.rel, at_key=at_key)
        return Location(getattr(self.node, "file", "<unknown>"), line, column)


@dataclass
class Entry:
    """One named definition (``certificates.www``) as found in one file."""

    kind: str
    name: str
    value: Any
    site: Site  # the collection mapping, path (kind,), rel (name,)
    ok: bool = True  # passed the schema (and safety) checks

    @property
    def location(self) -> Location:
        return self.site.location(at_key=True)


@dataclass
class Problems:
    """Collects problems, deduplicated; :meth:`raise_if_any` raises them sorted."""

    file_order: dict[str, int] = field(default_factory=dict)
    _seen: dict[tuple[Any, ...], Problem] = field(default_factory=dict)

    def add(self, problem: Problem) -> None:
        key = (problem.file, problem.line, problem.column, problem.path, problem.message)
        self._seen.setdefault(key, problem)

    def at(self, site: Site, message: str, *, at_key: bool = False) -> None:
        loc = site.location(at_key=at_key)
        self.add(Problem(message, loc.file, loc.line, loc.column, format_path(site.full_path)))

    def sorted(self) -> list[Problem]:
        order = self.file_order

        def key(p: Problem) -> tuple[int, str, int, int, str]:
            return (
                order.get(p.file or "", -1),
                p.file or "",
                p.line or 0,
                p.column or 0,
                p.path or "",
            )

        return sorted(self._seen.values(), key=key)

    def raise_if_any(self) -> None:
        if not self._seen:
            return
        problems = self.sorted()
        if len(problems) > MAX_PROBLEMS:
            rest = len(problems) - MAX_PROBLEMS
            problems = [*problems[:MAX_PROBLEMS], Problem(f"... and {rest} more problems")]
        raise InventoryError(problems)

"""``certctl daemon --watch``: re-plan (or apply) when inventory files change.

A watchdog observer watches the inventory directory (not recursively: like the
loader, only its non-hidden ``*.yaml``/``*.yml`` files count, so state writes under
``.certctl/`` and deployed output never trigger it). Each relevant event calls
``on_change``, which the daemon wires to :meth:`Scheduler.trigger` with the debounce
delay: a burst of saves gives one re-plan, ``debounce`` seconds after the last.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from certctl.inventory.loader import SUFFIXES


class _Handler(FileSystemEventHandler):
    def __init__(self, watched: Path, only: Path | None, on_change: Callable[[], None]) -> None:
        self.watched = watched
        self.only = only
        self.on_change = on_change

    def relevant(self, path: str | bytes) -> bool:
        if not path:
            return False
        p = Path(os.fsdecode(path))
        if self.only is not None:
            return p == self.only
        return p.parent == self.watched and p.suffix in SUFFIXES and not p.name.startswith(".")

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if self.relevant(event.src_path) or self.relevant(getattr(event, "dest_path", "")):
            self.on_change()


class InventoryWatch:
    def __init__(self, inventory: Path, on_change: Callable[[], None]) -> None:
        inv = inventory.expanduser().absolute()
        watched = inv if inv.is_dir() else inv.parent
        self._handler = _Handler(watched, None if inv.is_dir() else inv, on_change)
        self._observer: BaseObserver | None = None
        self.watched = watched

    def start(self) -> None:
        obs = Observer()
        obs.schedule(self._handler, str(self.watched), recursive=False)
        obs.start()
        self._observer = obs

    def stop(self) -> None:
        obs = self._observer
        if obs is not None:
            obs.stop()
            obs.join(10)
            self._observer = None

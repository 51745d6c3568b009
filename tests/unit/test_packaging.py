"""setup.cfg lists its packages by hand (connectors/ and schemas/ install under
certctl-owned names that ``find:`` cannot discover); this keeps the list complete."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAPPED = {
    "certctl": "certctl",
    "connectors": "certctl_connectors",
    "schemas": "certctl_schemas",
    "playbooks": "certctl_playbooks",
}


def test_every_package_directory_is_listed_in_setup_cfg() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = set()
    for folder, name in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join((name, *rel.parts)))
    assert on_disk - listed == set(), "packages missing from setup.cfg [options] packages"
    assert listed - on_disk == set(), "setup.cfg lists packages that do not exist"

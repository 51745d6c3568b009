"""Discovery findings in the state store (migration 0004, table ``discovered``),
written once for both backends over their ``_query``/``_execute_many`` primitives."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from certctl.discovery.model import Finding
from certctl.state.common import ServerReads, chunks, dump_json, load_json, utc

_COLUMNS = (
    "source, host, location, sni, fingerprint, format, subject, sans, issuer, serial, "
    "not_before, not_after, key_algorithm, key_size, self_signed, key_path, chain_pem, "
    "signature_algorithm, key_in_store, first_seen_at, seen_at"
)
_UPDATED = (
    "format", "subject", "sans", "issuer", "serial", "not_before", "not_after",
    "key_algorithm", "key_size", "self_signed", "key_path", "chain_pem",
    "signature_algorithm", "key_in_store", "seen_at",
)  # fmt: skip
_UPSERT = (
    f"INSERT INTO discovered ({_COLUMNS}) VALUES ({', '.join('?' * 21)}) "
    "ON CONFLICT (source, host, location, sni, fingerprint) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _UPDATED)
)


class FindingsStore(ServerReads):
    """The findings methods of :class:`certctl.state.base.StateStore`."""

    @abc.abstractmethod
    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Run one write statement (``?`` placeholders) once per row, all in ONE
        transaction; the number of rows."""

    def record_findings(self, findings: Sequence[Finding]) -> int:
        if not findings:
            return 0
        rows: list[tuple[Any, ...]] = []
        for f in findings:
            seen = self._ts_in(utc(f.seen_at))
            rows.append(
                (
                    f.source,
                    f.host,
                    f.location,
                    f.sni or "",
                    f.fingerprint,
                    f.format,
                    f.subject,
                    dump_json(list(f.sans)),
                    f.issuer,
                    f.serial,
                    self._ts_in(utc(f.not_before)),
                    self._ts_in(utc(f.not_after)),
                    f.key_algorithm,
                    int(f.key_size),
                    bool(f.self_signed),
                    f.key_path,
                    f.chain_pem,
                    f.signature_algorithm,
                    bool(f.key_in_store),
                    seen,
                    seen,
                )
            )
        return self._execute_many(_UPSERT, rows)

    def list_findings(
        self,
        *,
        source: str | None = None,
        host: str | None = None,
        fingerprint: str | None = None,
    ) -> list[Finding]:
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("source", source), ("host", host), ("fingerprint", fingerprint)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = f"SELECT {_COLUMNS} FROM discovered"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += (
            f" ORDER BY source{self._collate}, host{self._collate}, "
            f"location{self._collate}, sni{self._collate}, fingerprint"
        )
        return [self._finding(r) for r in self._query(sql, params)]

    def issued_fingerprints(self, fingerprints: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for part in chunks(sorted(set(fingerprints)), 500):
            marks = ", ".join("?" for _ in part)
            rows = self._query(
                f"SELECT DISTINCT fingerprint FROM certificate_versions "
                f"WHERE fingerprint IN ({marks})",
                list(part),
            )
            out.update(str(r[0]) for r in rows)
        return out

    def issuer_chains(self) -> list[tuple[str, bytes]]:
        rows = self._query(
            "SELECT DISTINCT issuer, chain_pem FROM certificate_versions "
            f"ORDER BY issuer{self._collate}"
        )
        return [(str(r[0]), bytes(r[1])) for r in rows]

    def _finding(self, r: Sequence[Any]) -> Finding:
        def ts(value: Any) -> Any:
            out = self._ts_out(value)
            assert out is not None  # NOT NULL columns
            return out

        return Finding(
            source=str(r[0]),
            host=str(r[1]),
            location=str(r[2]),
            sni=str(r[3]) or None,
            fingerprint=str(r[4]),
            format=str(r[5]),
            subject=str(r[6]),
            sans=tuple(str(s) for s in (load_json(r[7]) or [])),
            issuer=str(r[8]),
            serial=str(r[9]),
            not_before=ts(r[10]),
            not_after=ts(r[11]),
            key_algorithm=str(r[12]),
            key_size=int(r[13]),
            self_signed=bool(r[14]),
            key_path=r[15],
            chain_pem=str(r[16]),
            signature_algorithm=str(r[17]),
            key_in_store=bool(r[18]),
            seen_at=ts(r[20]),
        )

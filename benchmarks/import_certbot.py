"""Import benchmark: `certctl import certbot` of 1,000 lineages, then `certctl plan`.

The certbot directory is a layout built by this script in certbot's format
(``renewal/NAME.conf`` with ``[renewalparams]``, ``live/NAME/*.pem`` symlinks into
``archive/NAME/*1.pem``), each lineage an ECDSA P-256 certificate signed by a
throwaway CA, because running Debian's certbot 1,000 times against Pebble would
measure certbot. The import is the real command (in process): parse, read and check
every key, take the symlinks over, write and validate the inventory, seed the SQLite
state in one transaction. Then the plan must say "no changes" (it stats every file).

Last line: ``RESULT import_lineages_per_s=... plan_after_import_s=...``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certctl.cli import cli

N = int(os.environ.get("BENCH_LINEAGES", "1000"))

CONF = """\
version = 2.1.0
archive_dir = {d}/archive/{n}
cert = {d}/live/{n}/cert.pem
privkey = {d}/live/{n}/privkey.pem
chain = {d}/live/{n}/chain.pem
fullchain = {d}/live/{n}/fullchain.pem

# Options used in the renewal process
[renewalparams]
account = 0f98c355d6cdb79b527c67ec257ac718
key_type = ecdsa
server = https://acme.bench.test/dir
authenticator = webroot
webroot_path = /var/www/html,
[[webroot_map]]
{n} = /var/www/html
"""


def build(d: Path) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    now = datetime.now(UTC) - timedelta(days=1)
    ca_pem = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    for sub in ("renewal", "live", "archive"):
        (d / sub).mkdir(parents=True)
    for i in range(N):
        n = f"l{i:05d}.bench.test"
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n)]), critical=False)
            .sign(ca_key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        arch, live = d / "archive" / n, d / "live" / n
        arch.mkdir()
        live.mkdir()
        files = {"cert": cert, "chain": ca_pem, "fullchain": cert + ca_pem, "privkey": key_pem}
        for role, data in files.items():
            (arch / f"{role}1.pem").write_bytes(data)
            (live / f"{role}.pem").symlink_to(f"../../archive/{n}/{role}1.pem")
        (arch / "privkey1.pem").chmod(0o600)
        (d / "renewal" / f"{n}.conf").write_text(CONF.format(d=d, n=n))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="certctl-bench-import-") as tmp:
        base = Path(tmp)
        t = time.perf_counter()
        build(base / "letsencrypt")
        print(f"built {N} certbot lineages in {time.perf_counter() - t:.1f}s", flush=True)
        inv = base / "inventory"
        runner = CliRunner()
        t = time.perf_counter()
        res = runner.invoke(cli, ["-i", str(inv), "import", "certbot", str(base / "letsencrypt")])
        took = time.perf_counter() - t
        if res.exit_code != 0:
            print(res.output[-2000:], file=sys.stderr)
            raise SystemExit(1)
        print(f"import: {N} lineages in {took:.2f}s ({N / took:.0f}/s)", flush=True)
        t = time.perf_counter()
        res = runner.invoke(cli, ["-i", str(inv), "plan", "--detailed-exitcode"])
        plan_s = time.perf_counter() - t
        if res.exit_code != 0:
            print(res.output[-2000:], file=sys.stderr)
            raise SystemExit(1)
        print(f"plan after import: no changes, {plan_s:.2f}s", flush=True)
        print(f"RESULT import_lineages_per_s={N / took:.0f} plan_after_import_s={plan_s:.2f}")


if __name__ == "__main__":
    main()

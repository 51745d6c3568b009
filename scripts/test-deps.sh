#!/usr/bin/env bash
# Install and start the system pieces the tests talk to. Idempotent; safe on a fresh
# Debian machine (run as root, as CI does) and a no-op where everything is present.
set -euo pipefail

need=()
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# ACME tests: Pebble and pebble-challtestsrv (Debian package "pebble").
[[ -x /usr/bin/pebble && -x /usr/bin/pebble-challtestsrv ]] || need+=(pebble)
# ACME dns-01 over RFC 2136 + TSIG: a real BIND 9 named (Debian "bind9", "bind9-utils").
[[ -x /usr/sbin/named ]] || need+=(bind9 bind9-utils)
# certctl import certbot: a real certbot directory made by Debian's certbot against Pebble.
[[ -x /usr/bin/certbot ]] || need+=(certbot)
# SSH/service targets: the tests start their own sshd, nginx and haproxy on loopback.
[[ -x /usr/sbin/sshd ]] || need+=(openssh-server)
[[ -x /usr/sbin/nginx ]] || need+=(nginx)
[[ -x /usr/sbin/haproxy ]] || need+=(haproxy)
[[ -x /usr/bin/sudo ]] || need+=(sudo)
# JKS keystores (ssh target's JKS output, discovery tests): the JDK's keytool.
[[ -x /usr/bin/keytool ]] || need+=(default-jre-headless)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  need+=(postgresql)
fi
if ((${#need[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing system packages: ${need[*]} (run as root to install them)" >&2
  fi
fi

# PostgreSQL: the tests use 127.0.0.1:5432 when it answers; start the machine's
# cluster if it is installed but stopped. (The test fixture otherwise starts a
# throwaway cluster of its own.)
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && command -v pg_ctlcluster >/dev/null 2>&1; then
  for v in $(ls /etc/postgresql 2>/dev/null); do
    pg_ctlcluster --skip-systemctl-redirect "$v" main start 2>/dev/null || true
  done
fi
exit 0

"""Service presets: thin configurations of :class:`.ssh.ServiceTarget`.

Presets: ``nginx``, ``haproxy``, ``apache``, ``postfix``, ``dovecot``, ``traefik``,
``caddy``, ``envoy`` (files plus an optional SDS secret file) and ``command``
(generic, like ``ssh``). Each only changes defaults (the ``validate`` and ``reload``
argument lists) and which files it needs; everything else
-- SSH or local, staging, backups, rollback, verification, observe -- is the one
mechanism in :mod:`.ssh`. A placement's own ``validate: [...]`` / ``reload: [...]``
replace the defaults (``[]`` turns one off).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from certctl.connectors import Target
from certctl_connectors.targets.ssh import ServiceTarget, _schema


class NginxTarget(ServiceTarget):
    """nginx: certificate (or full chain) + key files, ``nginx -t``, ``nginx -s reload``."""

    type_name = "nginx"
    config_schema: ClassVar[Mapping[str, Any]] = _schema("nginx")
    default_validate = ("nginx", "-t")
    default_reload = ("nginx", "-s", "reload")
    required_roles = (("fullchain", "cert", "combined"), ("key", "combined"))


class HAProxyTarget(ServiceTarget):
    """HAProxy: one combined PEM (chain + key), ``haproxy -c -f``, service reload."""

    type_name = "haproxy"
    config_schema: ClassVar[Mapping[str, Any]] = _schema("haproxy")
    default_validate = ("haproxy", "-c", "-f", "/etc/haproxy/haproxy.cfg")
    default_reload = ("systemctl", "reload", "haproxy")
    required_roles = (("combined",),)


class ApacheTarget(ServiceTarget):
    """Apache httpd: files, ``apachectl configtest``, ``apachectl graceful``."""

    type_name = "apache"
    config_schema: ClassVar[Mapping[str, Any]] = _schema("apache")
    default_validate = ("apachectl", "configtest")
    default_reload = ("apachectl", "graceful")
    required_roles = (("fullchain", "cert"), ("key",))


class PostfixTarget(ServiceTarget):
    """Postfix: files (or one combined chain file), ``postfix check``, ``postfix reload``."""

    type_name = "postfix"
    config_schema: ClassVar[Mapping[str, Any]] = _schema("postfix")
    default_validate = ("postfix", "check")
    default_reload = ("postfix", "reload")
    required_roles = (("fullchain", "cert", "combined"), ("key", "combined"))


class DovecotTarget(ServiceTarget):
    """Dovecot: files, ``doveconf -n`` (parses the config), ``doveadm reload``."""

    type_name = "dovecot"
    config_schema: ClassVar[Mapping[str, Any]] = _schema("dovecot")
    default_validate = ("doveconf", "-n")
    default_reload = ("doveadm", "reload")
    required_roles = (("fullchain", "cert"), ("key",))


class TraefikTarget(ServiceTarget):
    """Traefik file provider: files in a watched directory; Traefik reloads by itself."""

    type_name = "traefik"
    config_schema: ClassVar[Mapping[str, Any]] = _schema("traefik")
    required_roles = (("fullchain", "cert"), ("key",))


class CaddyTarget(ServiceTarget):
    """Caddy: files, ``caddy validate`` and ``caddy reload`` of the Caddyfile."""

    type_name = "caddy"
    config_schema: ClassVar[Mapping[str, Any]] = _schema("caddy")
    default_validate = ("caddy", "validate", "--config", "/etc/caddy/Caddyfile")
    default_reload = ("caddy", "reload", "--config", "/etc/caddy/Caddyfile")
    required_roles = (("fullchain", "cert"), ("key",))


class EnvoyTarget(ServiceTarget):
    """Envoy: certificate chain + key files and, with ``sds_path``, an SDS secret file
    (JSON, or YAML for ``.yaml``/``.yml``) naming them (``sds_name``, default the
    certificate's name). Envoy watches the SDS file and reloads by itself; no
    validate or reload by default."""

    type_name = "envoy"
    config_schema: ClassVar[Mapping[str, Any]] = _schema("envoy", sds=True)
    required_roles = (("fullchain", "cert"), ("key",))


class CommandTarget(ServiceTarget):
    """Generic: your files plus your own ``validate`` / ``reload`` commands."""

    type_name = "command"
    config_schema: ClassVar[Mapping[str, Any]] = _schema("command")


CONNECTORS: list[type[Target]] = [
    NginxTarget,
    HAProxyTarget,
    ApacheTarget,
    PostfixTarget,
    DovecotTarget,
    TraefikTarget,
    CaddyTarget,
    EnvoyTarget,
    CommandTarget,
]

"""Jinja2 templating of inventory strings, sandboxed and strict.

Templates render in an :class:`jinja2.sandbox.ImmutableSandboxedEnvironment` (no
attribute access to internals such as ``__class__``, no mutation of the context)
with :class:`jinja2.StrictUndefined` (a misspelt variable is an error, never an
empty string) and autoescaping off (the output is a path or a name, not HTML).

Beyond the sandbox, templates cannot allocate without bound: ``namespace`` (the only
way to accumulate across loop iterations), ``lipsum``, ``cycler`` and ``joiner`` are
removed; ``*`` and ``**`` refuse results larger than :data:`MAX_OUTPUT`; width-taking
filters refuse huge widths; and the rendered text is capped at :data:`MAX_OUTPUT`.

Strings without ``{{``, ``{%`` or ``{#`` are returned as they are, without touching
Jinja, and each distinct template is compiled once per load: a 10,000-certificate
inventory renders the same handful of target templates thousands of times.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
import jinja2.sandbox
from jinja2.exceptions import SecurityError

from certctl.inventory.yamlload import MAX_STRING

MAX_OUTPUT = MAX_STRING
_WIDTH_FILTERS = ("center", "indent", "wordwrap", "truncate", "format")
_MESSAGE_LIMIT = 300


class TemplateProblem(Exception):
    """A template failed to compile or render; ``str()`` is a one-line message."""


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


class _Environment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox, with arithmetic that cannot be used to exhaust memory."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                sized = isinstance(seq, (str, list, tuple)) and isinstance(times, int)
                if sized and len(seq) * times > MAX_OUTPUT:
                    raise SecurityError("repetition result is too large")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise SecurityError("exponent is too large")
        return super().call_binop(context, operator, left, right)


def _bounded(fn: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        for arg in (*args[1:], *kwargs.values()):
            if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_OUTPUT:
                raise SecurityError("filter argument is too large")
        return fn(*args, **kwargs)

    if hasattr(fn, "jinja_pass_arg"):  # keep Jinja's pass_context/pass_environment mark
        guarded.jinja_pass_arg = fn.jinja_pass_arg  # type: ignore[attr-defined]
    return guarded


_SIMPLE_EXPR = re.compile(r"\{\{ *([A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z][A-Za-z0-9_]*)*) *\}\}")
_MISSING = object()


def _simple(source: str) -> list[str | tuple[str, ...]] | None:
    """Split a template made only of text and ``{{ a.b.c }}`` lookups, else ``None``.

    Such templates (``{{ cert.name }}.pem``: nearly all of them) are rendered without
    Jinja by :meth:`Renderer._render_simple`, which falls back to Jinja whenever the
    result could differ from what Jinja would produce.
    """
    parts: list[str | tuple[str, ...]] = []
    pos = 0
    for m in _SIMPLE_EXPR.finditer(source):
        parts.append(source[pos : m.start()])
        parts.append(tuple(m.group(1).split(".")))
        pos = m.end()
    parts.append(source[pos:])
    text = "".join(p for p in parts if isinstance(p, str))
    if is_template(text) or source.endswith("\n"):
        return None
    return parts


class Renderer:
    """Renders inventory strings; one instance per inventory load (it caches)."""

    def __init__(self) -> None:
        env = _Environment(undefined=jinja2.StrictUndefined, autoescape=False)
        for name in ("namespace", "lipsum", "cycler", "joiner"):
            env.globals.pop(name, None)
        for name in _WIDTH_FILTERS:
            if name in env.filters:
                env.filters[name] = _bounded(env.filters[name])
        self._env = env
        self._compiled: dict[str, jinja2.Template | TemplateProblem] = {}
        self._simple: dict[str, list[str | tuple[str, ...]] | None] = {}

    def compile(self, source: str) -> jinja2.Template:
        found = self._compiled.get(source)
        if found is None:
            try:
                found = self._env.from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                found = TemplateProblem(_clip(f"template syntax error: {exc.message}"))
            except Exception as exc:  # a template is user input; never a traceback
                found = TemplateProblem(_clip(f"template error: {exc}"))
            self._compiled[source] = found
        if isinstance(found, TemplateProblem):
            raise found
        return found

    def render(self, source: str, context: Mapping[str, Any]) -> str:
        """Render ``source`` (returned unchanged when it is not a template)."""
        if not is_template(source):
            return source
        try:
            parts = self._simple[source]
        except KeyError:
            parts = self._simple[source] = _simple(source)
        if parts is not None:
            out = _render_simple(parts, context)
            if out is not None:
                return out
        template = self.compile(source)
        try:
            out = template.render(context)
        except SecurityError as exc:
            raise TemplateProblem(_clip(f"template not allowed: {exc}")) from None
        except jinja2.UndefinedError as exc:
            raise TemplateProblem(_clip(f"template error: {exc.message}")) from None
        except jinja2.TemplateError as exc:
            raise TemplateProblem(_clip(f"template error: {exc.message or exc}")) from None
        except Exception as exc:  # a template is user input; never a traceback
            raise TemplateProblem(_clip(f"template error: {type(exc).__name__}: {exc}")) from None
        if len(out) > MAX_OUTPUT:
            raise TemplateProblem(
                f"template output is too long ({len(out)} characters, at most {MAX_OUTPUT})"
            )
        if "\x00" in out:
            raise TemplateProblem("template output contains a NUL character (\\x00)")
        return out


def _render_simple(parts: list[str | tuple[str, ...]], context: Mapping[str, Any]) -> str | None:
    """Render text and plain lookups as Jinja would, or ``None`` to let Jinja do it.

    Only lookups through plain dicts whose keys exist and that do not shadow a dict
    attribute (Jinja tries attributes first), ending in a ``str`` or ``int``, are
    handled here; everything else, errors included, goes to Jinja.
    """
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        value: Any = context.get(part[0], _MISSING)
        for attr in part[1:]:
            if type(value) is not dict or attr not in value or hasattr(dict, attr):
                return None
            value = value[attr]
        if type(value) is str:
            out.append(value)
        elif type(value) is int:
            out.append(str(value))
        else:
            return None
    return "".join(out)


def _clip(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= _MESSAGE_LIMIT else message[: _MESSAGE_LIMIT - 1] + "…"


def contains_template(value: Any) -> bool:
    """Whether any string inside ``value`` (keys excluded) is a template."""
    if isinstance(value, str):
        return is_template(value)
    if isinstance(value, Mapping):
        return any(contains_template(v) for v in value.values())
    if isinstance(value, list):
        return any(contains_template(v) for v in value)
    return False

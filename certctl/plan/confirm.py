"""The question ``apply`` asks before it acts: the plan, then "yes" on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from certctl.errors import CertctlError
from certctl.model import Plan
from certctl.plan.render import render_text


def confirm_plan(auto_approve: bool) -> Callable[[Plan], bool]:
    """Shows the plan; true when ``auto_approve`` or the user types "yes". Off a
    terminal without ``auto_approve`` it refuses (CertctlError) instead of asking."""

    def confirm(plan: Plan) -> bool:
        click.echo(render_text(plan), nl=False)
        if auto_approve:
            return True
        if not sys.stdin.isatty():
            raise CertctlError(
                "apply needs confirmation: run it on a terminal, pass --auto-approve, "
                "or apply a saved plan file"
            )
        answer = click.prompt(
            "\nDo you want to perform these actions? Only 'yes' will be accepted", default=""
        )
        return bool(answer.strip() == "yes")

    return confirm

"""Ways to reach a host: this machine (:mod:`.local`) or SSH (:mod:`.ssh`).

Both implement :class:`certctl.transport.base.HostIO`, so a target's deploy logic is
written once and runs the same on the controller and on a remote host.
"""

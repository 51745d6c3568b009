"""Bundled playbooks (installed as ``certctl_playbooks``; run with ``certctl run NAME``)."""

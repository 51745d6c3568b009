"""Playbooks: reviewable runbooks run with ``certctl run``."""

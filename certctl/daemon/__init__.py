"""The reconcile daemon: scheduler loops with jitter, git-triggered reconcile, hooks."""

"""certctl: declarative certificate-lifecycle reconciler."""

__version__ = "0.1.0"

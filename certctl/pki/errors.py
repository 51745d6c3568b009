"""The one error type of :mod:`certctl.pki`.

Every ``cryptography`` exception (``ValueError``, ``TypeError``,
``UnsupportedAlgorithm``...) raised by a pki helper is translated into
:class:`PKIError` with ``raise ... from``. It derives from
:class:`certctl.errors.PermanentError`: bad key material or a malformed certificate
does not get better by retrying.
"""

from __future__ import annotations

from certctl.errors import PermanentError


class PKIError(PermanentError):
    """Key, certificate or name material is unusable. Never carries key bytes."""

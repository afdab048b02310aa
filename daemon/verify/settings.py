"""The verifier caps and sandbox settings in force in this process.

``TapdSettings.verify`` is the source; a service calls :func:`configure` with
it at start-up. Until then the defaults apply (they are safe: the caps exist
whether or not anyone configured them).
"""

from __future__ import annotations

import threading

from daemon.config import VerifySettings

_lock = threading.Lock()
_current = VerifySettings()


def configure(settings: VerifySettings) -> None:
    """Make ``settings`` the caps every verifier built from now on uses."""
    global _current
    with _lock:
        _current = settings


def current() -> VerifySettings:
    return _current

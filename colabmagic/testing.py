"""Helpers for colabmagic's own tests (and for projects that test code built on it).

``require`` turns a missing component into a skip, or into a failure when
``COLABMAGIC_REQUIRE_ALL=1`` (CI sets it). ``wait_until`` waits on a condition with a deadline,
never on a bare sleep.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def require_all() -> bool:
    """True when missing test components must fail instead of skip."""
    return os.environ.get("COLABMAGIC_REQUIRE_ALL") == "1"


def require(condition: bool, reason: str) -> None:
    """Skip the calling test (or fail under ``COLABMAGIC_REQUIRE_ALL=1``) unless *condition*."""
    import pytest

    if condition:
        return
    if require_all():
        pytest.fail(f"required component missing (COLABMAGIC_REQUIRE_ALL=1): {reason}")
    pytest.skip(reason)


def wait_until(
    condition: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> T:
    """Poll *condition* until it returns a truthy value; raise ``TimeoutError`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout:g}s waiting for {what or condition!r}"
            raise TimeoutError(msg)
        time.sleep(interval)

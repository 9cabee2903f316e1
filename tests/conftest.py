"""Shared fixtures and the COLABMAGIC_REQUIRE_ALL policy.

Tests that need a component which is absent (sshd, ffmpeg, chromium) call
``colabmagic.testing.require`` and skip with a reason; with ``COLABMAGIC_REQUIRE_ALL=1`` (set by CI)
that becomes a failure, so nothing silently stops being tested. Tests marked ``gpu`` are the one
exception: CI has no GPU, so they stay skipped there and run on a CUDA machine.
"""

from __future__ import annotations

import pytest

from colabmagic.testing import require_all


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (require_all() and report.skipped) or "gpu" in item.keywords:
        return
    if hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"skipped under COLABMAGIC_REQUIRE_ALL=1: {reason}"

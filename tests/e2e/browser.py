"""Headless Chromium for the page tests: Debian's package, offline but for 127.0.0.1.

The flags and host rules every page test launches Chromium with, and what a test does
when Chromium or Playwright's Python package is missing: skip on a developer's machine,
fail in CI (which installs both). The ``chromium`` fixture is in ``tests/e2e/conftest.py``.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]
# Nothing resolves except 127.0.0.1 itself: an external asset can only fail to load.
OFFLINE_RULES = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


def missing(what: str) -> NoReturn:
    """Skip (or, in CI, fail) a test that needs a browser part that is not installed."""
    message = f"{what}; `make browser` installs Debian's chromium (needs root)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} -- CI must run the browser tests")
    pytest.skip(message)

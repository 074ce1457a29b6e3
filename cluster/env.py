"""The one module that reads or sets environment variables (house rule: nowhere else)."""

from __future__ import annotations

import os
from collections.abc import Mapping


def environ() -> Mapping[str, str]:
    """The process environment, read-only (secrets such as the router's bearer token)."""
    return os.environ


def keep_ray_on_loopback() -> None:
    """Ray binds to the machine's external address unless told; must run before Ray starts."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

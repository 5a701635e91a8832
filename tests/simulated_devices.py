"""The environment of a test script that runs on several simulated CPU devices."""

from __future__ import annotations

import os


def cpu_devices_env(count: int) -> dict[str, str]:
    """This process's environment with JAX on `count` CPU devices; XLA_FLAGS keeps conftest's."""
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip())

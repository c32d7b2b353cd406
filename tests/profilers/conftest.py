"""Fixtures shared by the profilers tests."""

from __future__ import annotations

import pytest

from profilers.records import Fingerprint


@pytest.fixture
def fingerprint() -> Fingerprint:
    """A fixed fingerprint that matches no real machine."""
    return Fingerprint(
        device_kind="cpu",
        device_name="Test CPU",
        device_count=1,
        cpu_model="Test CPU",
        threads=4,
        torch_version="2.13.0+cpu",
        cuda_version=None,
        driver_version=None,
        python_version="3.11.7",
        package_version="0",
    )

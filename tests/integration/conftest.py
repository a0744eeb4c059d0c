"""Integration tests start the real services they need (Prefect server and workers, moto's S3 server, llama.cpp,
the quantization libraries): every one of them is marked slow."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.slow)

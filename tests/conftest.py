"""Shared test setup: the test run keeps its ONNX export store to itself (never the user's cache)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_onnx_store(tmp_path_factory):
    """Exports are stored under a temporary folder for the whole run (subprocesses inherit it)."""
    old = os.environ.get("NVIT_CACHE_DIR")
    os.environ["NVIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("nvit-cache"))
    yield
    if old is None:
        os.environ.pop("NVIT_CACHE_DIR", None)
    else:
        os.environ["NVIT_CACHE_DIR"] = old

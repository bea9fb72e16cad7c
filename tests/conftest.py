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


@pytest.fixture(scope="module")
def prune_cli_inputs(tmp_path_factory):
    """What ``nvit prune`` needs from the command line: a latency table of vit_test from the fake backend of known
    latency (``lut.parquet``) and an untrained vit_test checkpoint (``base.pth``)."""
    import lut_fakes as fk
    import torch

    from nvit.models import build_model
    from nvit.presets import preset

    folder = tmp_path_factory.mktemp("prune_cli")
    fk.tiny_table(folder / "lut.parquet")
    torch.save(build_model(preset("vit_test"), seed=0).state_dict(), folder / "base.pth")
    return folder


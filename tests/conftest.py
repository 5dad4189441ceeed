"""Shared fixtures: tiny random models of every family, built in memory (no network, ever)."""

from __future__ import annotations

import os

import pytest
import torch

from suite.testing import FAMILY_NAMES, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`-n 2`, what .ci/run uses) each worker gets one core, its subprocesses too: two workers of two
# threads each on two cores run slower than one process.
_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)


@pytest.fixture(params=FAMILY_NAMES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(family: str):
    return tiny_model(family)

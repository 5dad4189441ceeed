"""Shared fixtures: tiny random models of every family, built in memory (no network, ever)."""

from __future__ import annotations

import os

import pytest
import torch

from suite.testing import FAMILY_NAMES, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(params=FAMILY_NAMES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(family: str):
    return tiny_model(family)

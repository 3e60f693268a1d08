"""Test setup: Triton's interpreter on CPU, one thread, and a fresh random seed per run.

Set MOEPASS_TEST_SEED to replay a run; the seed is printed in the pytest header.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import pytest
import torch

from helpers import SESSION_SEED, seed_for

torch.set_num_threads(1)
# pytest-xdist workers start after this and inherit the environment: one seed for the whole run
os.environ.setdefault("MOEPASS_TEST_SEED", str(SESSION_SEED))


def pytest_report_header(config):
    return f"moepass test seed: {SESSION_SEED} (replay with MOEPASS_TEST_SEED={SESSION_SEED})"


@pytest.fixture
def seed(request) -> int:
    """A seed that differs per test and per run; torch's global RNG is seeded with it."""
    value = seed_for(request.node.nodeid)
    torch.manual_seed(value)
    return value

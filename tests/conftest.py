"""Shared fixtures. `one_thread`: tiny models on a busy 2-core machine lose far more to intra-op threads
than they gain, so modules of small-model tests run with one torch thread (and restore the setting)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

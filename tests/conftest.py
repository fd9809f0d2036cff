"""Shared fixtures. Tests build tiny models and media on the spot; nothing is downloaded."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker():
    """Two xdist workers on two cores: one torch thread each avoids oversubscription."""
    import torch

    torch.set_num_threads(1)

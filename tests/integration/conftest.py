"""Fixtures of the multi-process tests (test_multiprocess.py, test_sharded.py), built once per module."""

import pytest
from train_helpers import make_assets, one_process_reference


@pytest.fixture(scope="module")
def small_assets(tmp_path_factory):
    """16 synthetic training samples and the tiny checkpoints (train_helpers.make_assets)."""
    return make_assets(tmp_path_factory.mktemp("assets"), num_train=16)


@pytest.fixture(scope="module")
def one(small_assets, tmp_path_factory):
    """The 1-process reference run of ``small_assets`` (train_helpers.one_process_reference)."""
    return one_process_reference(small_assets, tmp_path_factory.mktemp("one") / "run")

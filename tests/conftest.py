"""Shared fixtures. Tests build tiny models and media on the spot; nothing is downloaded."""

import os

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (derandomize), without a local example database: a suite
# run must not pass or fail by the luck of the draw or by what an earlier run on this machine found. To explore
# new examples: pytest --hypothesis-profile=explore (or REFVLLM_HYPOTHESIS_PROFILE=explore).
settings.register_profile("refvllm", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("REFVLLM_HYPOTHESIS_PROFILE", "refvllm"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker():
    """Two xdist workers on two cores: one torch thread each avoids oversubscription."""
    import torch

    torch.set_num_threads(1)


# `make test` runs 2 workers with `--dist loadscope --no-loadscope-reorder`: each worker takes whole modules (their
# module fixtures built once) in collection order, so the modules that take longest go first (measured with
# `pytest --durations`, README "Tests"); a long module started last would leave the other worker idle. The order
# within a module is kept; unlisted modules follow in pytest's order.
LONGEST_FIRST = ("test_sharded.py", "test_real_shapes.py", "test_multiprocess.py", "test_demo_claim.py",
                 "test_train.py", "test_hub.py", "test_vlm_family.py", "test_eval.py", "test_export.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable sort

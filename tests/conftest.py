import os

import pytest
import torch
from hypothesis import settings

# CI runs the property tests derandomized (HYPOTHESIS_PROFILE=ci, .ci/run): the same examples every
# run, so a landing is never refused by a random draw; local runs keep exploring new examples
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Generated kernels run on CPU tensors through Triton's interpreter. Not on a GPU machine: there
# the interpreter would also patch the kernels compiled for CUDA (attncc loads a separate
# interpreted module for CPU tensors by itself).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the accelerator)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def isolated_refusals(monkeypatch, tmp_path):
    """Kernel refusals a test provokes are recorded in a cache of its own (runtime/cache.record_refusal)
    and forgotten by the process afterwards, so no other test's kernels see them. Yields that
    forgetting (a test calls it to act as a new process would: only the disk remembers)."""
    from attncc.runtime import cache

    def forget():
        for module in list(cache._MODULES.values()):
            module.__dict__.pop(cache._REFUSAL_ATTR, None)

    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "attncc-cache"))
    yield forget
    forget()

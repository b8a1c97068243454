import os

import pytest
import torch

# Generated kernels run on CPU tensors through Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the accelerator)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Test set-up: kernels run on the GPU when one is present, else through Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, so it is set here, before moe_opt is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device)")
    for item in items:
        if "gpu_only" in item.keywords:
            item.add_marker(skip)

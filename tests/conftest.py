"""pytest setup: tests import their helpers from tests/helpers.py; GPU tests skip without CUDA.

Without a GPU, Triton kernels run under its interpreter: TRITON_INTERPRET=1 must be set before
triton is first imported, which is here, before any test module.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Where the Triton kernel tests run, shared by tests/kernels/test_triton*.py.

Without CUDA the kernels run under the Triton interpreter, which needs
``TRITON_INTERPRET=1`` before Triton is first imported (``tests/kernels/conftest.py``
sets it); with CUDA nothing is set and they run compiled.
"""

from __future__ import annotations

import os

import pytest
import torch

from nanite_compile.kernels import triton_attn

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TRITON_MARKS = [
    pytest.mark.skipif(not triton_attn.available(), reason="triton is not installed"),
    pytest.mark.skipif(
        not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
        reason="no CUDA, and triton was imported before TRITON_INTERPRET=1 could be set "
        "(run the kernel tests as their own pytest process, or set it in the environment)",
    ),
]

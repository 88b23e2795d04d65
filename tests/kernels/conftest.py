"""Kernel tests: without CUDA, Triton kernels run under the Triton interpreter.

``TRITON_INTERPRET=1`` only takes effect if set before Triton is first imported
(its ``tl`` library functions are jitted at import, and ``torch._dynamo`` imports
Triton when it is installed), so it is set here, before any test module of this
folder imports ``nanite_compile``. With CUDA nothing is set: the Triton tests run
the compiled kernels on the GPU.
"""

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

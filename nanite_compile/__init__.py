"""nanite_compile: rewrite the attention of an existing PyTorch model into tiled,
level-of-detail attention under a compute budget.

    converted = nanite_compile.convert(model, budget=0.25)
    print(nanite_compile.report(converted))
    nanite_compile.save(converted, "out/")            # JSON + safetensors, no pickle
    converted = nanite_compile.load("out/", model)   # checked against the model
    nanite_compile.generate(converted, ids, max_new_tokens=64)  # cache bounded by the plan

or ``torch.compile(model, backend="nanite", options={"budget": 0.25})``.
Importing this package imports neither Triton nor CUDA.
"""

from .api import convert, report
from .config import NaniteConfig
from .generation import NaniteCache, generate
from .io import NaniteLoadError, load, save
from .report import RewriteReport, SiteReport

__all__ = [
    "convert",
    "report",
    "save",
    "load",
    "NaniteConfig",
    "NaniteCache",
    "generate",
    "NaniteLoadError",
    "RewriteReport",
    "SiteReport",
]
__version__ = "0.1.0"

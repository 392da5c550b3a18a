"""What a benchmark record says about the Python that ran it, beyond versions: whether torch's modules load from
compiled bytecode. A process that finds none compiles each module's source when it imports it (about 1,700 for
torch, 2.3 s of one core on the lent H200 machine, in each of a tune's 16 processes); a pip-installed torch has
its bytecode, while the lent machine's torch has no ``__pycache__`` and its environment sets
PYTHONDONTWRITEBYTECODE=1 (docs/performance.md)."""

from __future__ import annotations

import importlib.util
import os
import sys


def bytecode_state() -> dict:
    """{"dont_write_bytecode", "pycache_prefix", "torch_bytecode_cached"} of this interpreter (imports nothing)."""
    spec = importlib.util.find_spec("torch")
    cached = spec is not None and spec.origin is not None and os.path.exists(
        importlib.util.cache_from_source(spec.origin))
    return {"dont_write_bytecode": bool(sys.flags.dont_write_bytecode), "pycache_prefix": sys.pycache_prefix,
            "torch_bytecode_cached": bool(cached)}

"""moe_opt: find the fastest launch config of the Triton fused-MoE kernel with Optuna, resumably.

The public API is re-exported here; heavy dependencies (transformers, plotly, optuna-dashboard) load where used.

Without a CUDA GPU, Triton can only run kernels through its CPU interpreter, which must be chosen before the
kernels are defined; importing moe_opt on such a machine therefore sets TRITON_INTERPRET=1 unless it is set.
"""

import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from .errors import ConfigError, MoeOptError, SpecError, TuneError  # noqa: E402
from .kernel import fused_moe  # noqa: E402
from .models import resolve_model  # noqa: E402
from .space import Config, default_config  # noqa: E402
from .spec import ModelSpec  # noqa: E402
from .tuner import TuneResult, tune  # noqa: E402

# These modules import only the standard library and optuna at the top; optuna-dashboard, plotly and pandas load
# inside the functions. (The names shadow the submodules: import from them as ``from moe_opt.report import ...``.)
from .dashboard import dashboard, start_dashboard  # noqa: E402
from .report import report, summary  # noqa: E402

__all__ = ["Config", "ConfigError", "ModelSpec", "MoeOptError", "SpecError", "TuneError", "TuneResult",
           "dashboard", "default_config", "fused_moe", "report", "resolve_model", "start_dashboard", "summary",
           "tune"]
__version__ = "0.1.0"

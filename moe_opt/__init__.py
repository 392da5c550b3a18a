"""moe_opt: find the fastest launch config of the Triton fused-MoE kernel with Optuna, resumably.

The public API, re-exported here; heavy dependencies (transformers, plotly, optuna-dashboard) load where used.
"""

from .errors import ConfigError, MoeOptError, SpecError, TuneError
from .kernel import fused_moe
from .space import Config, default_config
from .spec import ModelSpec

__all__ = ["Config", "ConfigError", "ModelSpec", "MoeOptError", "SpecError", "TuneError", "default_config",
           "fused_moe"]
__version__ = "0.1.0"

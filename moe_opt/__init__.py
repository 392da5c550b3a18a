"""moe_opt: find the fastest launch config of the Triton fused-MoE kernel with Optuna, resumably.

The public API is this short list, re-exported here and loaded on first use, so ``import moe_opt`` imports
neither torch, Triton, Optuna, pandas nor plotly. The package is laid out by stage (docs/architecture.md):
model/ (what is tuned), space.py (the launch configs), kernel/ (the kernels that can be timed), measure/
(turning a config into a number), search/ (choosing the next config), store/ (what is kept), run/ (one tune),
export/ (files for the engines) and view/ (what a person looks at).
"""

from .errors import ConfigError, MoeOptError, SpecError, TuneError

__version__ = "0.2.0"

# name -> (module, attribute), imported on first access (PEP 562).
_LAZY = {
    "Config": ("moe_opt.space", "Config"),
    "default_config": ("moe_opt.space", "default_config"),
    "ModelSpec": ("moe_opt.model.spec", "ModelSpec"),
    "resolve_model": ("moe_opt.model.resolve", "resolve_model"),
    "fused_moe": ("moe_opt.kernel", "fused_moe"),
    "tune": ("moe_opt.run.tune", "tune"),
    "sweep": ("moe_opt.run.sweep", "sweep"),
    "SweepResult": ("moe_opt.run.sweep", "SweepResult"),
    "TuneResult": ("moe_opt.run.result", "TuneResult"),
    "report": ("moe_opt.view.report", "report"),
    "summary": ("moe_opt.view.report_data", "summary"),
    "dashboard": ("moe_opt.view.dashboard", "dashboard"),
    "start_dashboard": ("moe_opt.view.dashboard", "start_dashboard"),
}

__all__ = ["Config", "ConfigError", "ModelSpec", "MoeOptError", "SpecError", "SweepResult", "TuneError", "TuneResult",
           "dashboard", "default_config", "fused_moe", "report", "resolve_model", "start_dashboard", "summary", "sweep",
           "tune"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moe_opt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

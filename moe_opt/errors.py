"""The exceptions moe_opt raises for bad input. Each carries a one-line message naming what was wrong and what
is accepted; the CLI prints it and exits with code 2."""


class MoeOptError(ValueError):
    """Base class of moe_opt's bad-input errors."""


class SpecError(MoeOptError):
    """A model or shape cannot be turned into a ModelSpec: unknown architecture, bad tp/ep split, missing or
    malformed config, model not found offline."""


class ConfigError(MoeOptError):
    """A launch config or an input to the kernel is invalid."""


class TuneError(MoeOptError):
    """Bad arguments to tune(): batch sizes, n_trials, storage, replay table."""

"""Choosing the next config: one strategy interface over moe_opt's search, Optuna's samplers and the grid."""

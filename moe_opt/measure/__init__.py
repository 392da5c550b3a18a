"""Turning a config into a number: the measurer interface, the CUDA-graph timer, the interpreter timer, replay
tables, the isolated measuring process and the compile pool."""

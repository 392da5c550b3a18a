"""What is being tuned: the MoE layer's spec, resolved from a model id, a config.json or the bundled catalogue."""

"""Training engine: tokenizer-aware data, the explicit loop, and its launchers (inline or Ray)."""

"""The commands: one thin module per console script (compose the config, instantiate, hand over)."""

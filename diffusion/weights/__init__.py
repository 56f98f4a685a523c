"""Weights to sample: averages of the weights (EMA, power EMA, SWA), post-hoc EMA, choosing and loading them."""

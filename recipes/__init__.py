"""Training recipes (run as modules from the repository root: ``accelerate launch -m recipes.dg``)."""

"""``python -m recipes.dg`` / ``accelerate launch -m recipes.dg``: the DG sweep (see ``recipes/dg/train.py``)."""

from .train import main

if __name__ == "__main__":
    main()

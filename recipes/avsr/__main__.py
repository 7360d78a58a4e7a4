"""``python -m recipes.avsr`` / ``accelerate launch -m recipes.avsr``: see :mod:`recipes.avsr.train`."""

from .train import main

if __name__ == "__main__":
    main()

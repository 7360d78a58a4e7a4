"""``python -m recipes.avsr`` / ``accelerate launch -m recipes.avsr``: see :mod:`recipes.avsr.pipeline.main`."""

from .pipeline.main import main

if __name__ == "__main__":
    main()

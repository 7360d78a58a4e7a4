"""The experiments: entry points of their own that run the pipeline, each with its own options.

    accelerate launch -m recipes.avsr.experiments.sinks          # the sink paper's experiment in miniature
    accelerate launch -m recipes.avsr.experiments.decor_sweep    # choose the sink loss's λ on validation data
    python -m recipes.avsr.experiments.merge_sinks RUN [RUN ...] --output DIR   # one report from runs of one seed each
    python -m recipes.avsr.experiments.merge_seeds RUN [RUN ...] --output DIR   # likewise for training runs

Each takes every option of ``python -m recipes.avsr`` (presets included) plus its own (``--help``).
"""

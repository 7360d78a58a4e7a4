"""LLM-based ASR / VSR / AVSR with LoRA and optional sink decorrelation, in the Llama-AVSR style.

Run it with ``accelerate launch -m recipes.avsr`` (or ``python -m recipes.avsr``): :mod:`recipes.avsr.pipeline.main`
describes the default run and the options. Three rooms: ``pipeline/`` (configuration, data, models, training,
decoding and scoring), ``experiments/`` (entry points of their own) and ``reports/`` (tables and plots).
"""

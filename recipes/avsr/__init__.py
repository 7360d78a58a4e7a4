"""LLM-based ASR / VSR / AVSR with LoRA and optional sink decorrelation, in the Llama-AVSR style.

Run it with ``accelerate launch -m recipes.avsr`` (or ``python -m recipes.avsr``); :mod:`recipes.avsr.train` describes
the default run and the options.
"""

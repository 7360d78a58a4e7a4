"""The AVSR pipeline: configuration, data, encoders and LLM, model, training, decoding and scoring, saved weights.

``python -m recipes.avsr`` runs it (:mod:`recipes.avsr.pipeline.main`); the experiments
(:mod:`recipes.avsr.experiments`) are entry points of their own that run it, and the tables and plots live in
:mod:`recipes.avsr.reports`.
"""

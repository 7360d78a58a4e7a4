"""Helpers both tuners share: PEFT's private internals behind one door, model hooks, extra loss terms, and the
architecture facts of transformers models."""

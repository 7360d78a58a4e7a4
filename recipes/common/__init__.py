"""Pieces both recipes use: atomic checkpoints with a limit and resumption, summaries over seeds."""

"""Pieces both recipes use: atomic checkpoints with a limit and resumption, paired-difference intervals."""

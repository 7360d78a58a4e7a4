"""Data of the AVSR recipe: LRS3 on disk, decoding, batching, and the embedded synthetic corpus."""

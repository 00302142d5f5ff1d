"""The run directory: its layout and records (`layout`), the lock, checkpoints, provenance, model cards.

Light imports only: the CLI reads run directories before deciding to load anything heavy.
"""

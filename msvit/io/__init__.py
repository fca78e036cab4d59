"""Checkpoints on disk: saving and loading a model with the architecture and data config it was
built with (``checkpoint``), the architecture record that refuses mismatched weights
(``architecture``), readable errors for broken ``config.json`` files (``config_file``), and
crash-safe writes (``atomic``, with the fault-injection points the crash tests use in ``faults``).
"""

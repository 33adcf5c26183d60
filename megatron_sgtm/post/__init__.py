"""After training: ablation, pruning and export, evaluation, calibration, generation,
adversarial fine-tuning, RMU, the paper's metrics, and training-time baselines.

Library functions take an in-memory model (``megatron_sgtm.model.build_model`` output) and work
at any tensor-parallel size; the ``*_cli`` modules add checkpoints and files around them.
"""

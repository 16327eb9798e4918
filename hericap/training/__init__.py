"""Training on Ray Train: the driver (shards -> Ray Data -> ``TorchTrainer``), the worker recipe,
and the rules it uses (phases, optimiser, XE and SCST losses, run logs), which import without Ray.
"""

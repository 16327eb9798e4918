"""Training: checkpoints and optimisation rules (no Ray) and the Ray Train driver/loop.

:mod:`hericap.training.checkpoint` and :mod:`hericap.training.optim` import without Ray;
:mod:`hericap.training.loop` and :mod:`hericap.training.driver` run on Ray.
"""

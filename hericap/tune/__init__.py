"""Ray Tune + Optuna sweeps over decoder variants and hyperparameters (planned).

Sweeps will run one Ray Train run per trial through a function trainable (the Ray 2.60
pattern: ``Tuner(TorchTrainer)`` is refused), with spaces from ``tune_spaces/``.
"""

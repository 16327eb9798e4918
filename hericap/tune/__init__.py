"""Ray Tune + Optuna + ASHA sweeps over config keys (``sweep``): one Ray Train run per trial
through a function trainable (Ray 2.60 refuses ``Tuner(TorchTrainer)``), spaces from
``tune_spaces/``."""

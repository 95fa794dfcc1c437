"""tuner: staged hyperparameter tuning of PyTorch models on Optuna.

The stages follow the tuning playbook's order (batch size, learning rate, optimizer,
architecture); each stage is one Optuna study whose fixed values are the best ones the
stages before it found.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

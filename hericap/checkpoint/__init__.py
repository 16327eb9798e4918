"""HeriCap checkpoint folders: written by training and the importers, read by everything else.

One folder (or object prefix) holds the weights, the config, the vocabulary and the metadata, so
loading a checkpoint needs nothing outside it (:mod:`hericap.checkpoint.folder`).
"""

from hericap.checkpoint.folder import (
    CONFIG_FILE,
    META_FILE,
    MODEL_FILE,
    REQUIRED_FILES,
    STATE_FILE,
    VOCAB_FILE,
    LoadedCheckpoint,
    load_checkpoint,
    read_checkpoint_files,
    save_checkpoint,
)

__all__ = [
    "CONFIG_FILE",
    "META_FILE",
    "MODEL_FILE",
    "REQUIRED_FILES",
    "STATE_FILE",
    "VOCAB_FILE",
    "LoadedCheckpoint",
    "load_checkpoint",
    "read_checkpoint_files",
    "save_checkpoint",
]

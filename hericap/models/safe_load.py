"""Reading weight files without executing arbitrary pickled code.

Everything goes through ``torch.load(weights_only=True)``. Research checkpoints pickle a few
objects beside their tensors: GRIT's detector checkpoints an OmegaConf ``DictConfig`` (``args``),
the best caption checkpoints numpy float64 scores (``scores``). Those classes, and nothing else,
are allow-listed (:data:`ALLOWED_GLOBALS`): the unpickler rebuilds them from their data and refuses
any other global, so a file can carry no code of its own. ``.safetensors`` files hold tensors
only.
"""

from __future__ import annotations

import collections
import io
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode, BooleanNode, BytesNode, FloatNode, IntegerNode, StringNode

from hericap.data import storage

__all__ = ["ALLOWED_GLOBALS", "load_tensor_file", "read_weights"]

SAFETENSORS_SUFFIX = ".safetensors"

_NUMPY_SCALAR = np._core.multiarray.scalar
_NUMPY_RECONSTRUCT = np._core.multiarray._reconstruct

# What research files pickle besides tensors. Files written with numpy < 2 name the numpy
# helpers under numpy.core, newer ones under numpy._core: both names map to the same function.
ALLOWED_GLOBALS: list = [
    # numpy scalars and arrays (``scores`` of checkpoint_best_valid.pth)
    _NUMPY_SCALAR,
    (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),
    _NUMPY_RECONSTRUCT,
    (_NUMPY_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    *{type(np.dtype(code)) for code in ("f2", "f4", "f8", "i4", "i8", "u1", "b1")},
    # OmegaConf configs (``args`` of GRIT's detector checkpoints), built from YAML
    DictConfig,
    ListConfig,
    ContainerMetadata,
    Metadata,
    AnyNode,
    StringNode,
    IntegerNode,
    FloatNode,
    BooleanNode,
    BytesNode,
    typing.Any,
    collections.defaultdict,
    dict,
    list,
    int,
]


def load_tensor_file(data: bytes, name: str = "") -> Any:
    """Unpickle a ``torch.save`` file's bytes with weights_only and :data:`ALLOWED_GLOBALS`.

    Raises:
        ValueError: the file pickles something else (named in the message).
    """
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError with the reason
        raise ValueError(
            f"{name or 'weight file'} cannot be read safely (weights_only, allow-listed numpy "
            f"and OmegaConf types only): {str(e).splitlines()[-1][:400]}"
        ) from e


def read_weights(location: str | Path) -> Any:
    """A weight file from a local path or ``s3://`` URI: ``.safetensors`` as a dict of tensors,
    anything else through :func:`load_tensor_file`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable content.
    """
    data = storage.read_bytes(location)
    if str(location).endswith(SAFETENSORS_SUFFIX):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as e:
            raise ValueError(f"{location} is not a readable safetensors file: {e}") from e
    return load_tensor_file(data, name=str(location))

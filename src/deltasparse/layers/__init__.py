"""Training-time layers: the Delta Activation Layer, the L1 baseline and time handling."""

from ._base import LayerStats, SparsityLayer
from .delta import (
    DeltaActivation,
    hysteresis_step,
    is_stateful,
    quantize,
    reset_state,
    streaming,
)
from .l1 import ActivationL1
from .token import TokenDelta
from .video import VideoModel, clip_context, sparsity_layers

__all__ = [
    "ActivationL1",
    "DeltaActivation",
    "LayerStats",
    "SparsityLayer",
    "TokenDelta",
    "VideoModel",
    "clip_context",
    "hysteresis_step",
    "is_stateful",
    "quantize",
    "reset_state",
    "sparsity_layers",
    "streaming",
]

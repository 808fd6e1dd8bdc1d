"""deltasparse: train for spatio-temporal activation sparsity and exploit it on streams.

Implements the Delta Activation Layer of Yousefzadeh & Sifalakis, "Training for temporal
sparsity in deep neural networks, application in video processing" (arXiv 2107.07305).
"""

from . import losses, models
from .convert import DeltaConfig, convert, revert
from .layers import (
    ActivationL1,
    DeltaActivation,
    LayerStats,
    TokenDelta,
    VideoModel,
    reset_state,
    streaming,
)
from .losses import (
    Constant,
    LinearWarmup,
    MultiStageSine,
    make_schedule,
    set_sparsity_weight,
    sparsity_loss,
)
from .metrics import LayerReport, SparsityReport, measure

__version__ = "0.1.0"


def __getattr__(name):
    # The engine is imported lazily so that training-only users do not pay for it.
    if name == "DeltaEngine":
        from .engine import DeltaEngine

        return DeltaEngine
    raise AttributeError(f"module 'deltasparse' has no attribute {name!r}")


__all__ = [
    "ActivationL1",
    "Constant",
    "DeltaActivation",
    "DeltaConfig",
    "DeltaEngine",
    "LayerReport",
    "LayerStats",
    "LinearWarmup",
    "MultiStageSine",
    "SparsityReport",
    "TokenDelta",
    "VideoModel",
    "__version__",
    "convert",
    "losses",
    "make_schedule",
    "measure",
    "models",
    "reset_state",
    "revert",
    "set_sparsity_weight",
    "sparsity_loss",
    "streaming",
]

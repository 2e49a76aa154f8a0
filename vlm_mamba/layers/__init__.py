"""Small modules the models are built from (export list only; see each module)."""

from vlm_mamba.layers.block import Block
from vlm_mamba.layers.mamba1 import MambaMixer
from vlm_mamba.layers.mamba2 import Mamba2Mixer
from vlm_mamba.layers.norm import RMSNorm, RMSNormGated
from vlm_mamba.layers.state import InferenceState, MixerState

__all__ = [
    "Block",
    "MambaMixer",
    "Mamba2Mixer",
    "RMSNorm",
    "RMSNormGated",
    "InferenceState",
    "MixerState",
]

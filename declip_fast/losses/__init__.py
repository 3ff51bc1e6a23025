"""Losses users import: drop-ins for OpenCLIP's, backed by declip_fast.kernels."""

from declip_fast.losses.clip import ClipLoss
from declip_fast.losses.coca import CoCaLoss
from declip_fast.losses.declip import DeCLIPLoss, DeCLIPLossConfig
from declip_fast.losses.distill import DistillClipLoss
from declip_fast.losses.nns import FeatureQueue, NNSLoss
from declip_fast.losses.siglip import SigLipLoss
from declip_fast.losses.ssl import MLMLoss, SimSiamLoss

__all__ = [
    "ClipLoss",
    "CoCaLoss",
    "DeCLIPLoss",
    "DeCLIPLossConfig",
    "DistillClipLoss",
    "FeatureQueue",
    "MLMLoss",
    "NNSLoss",
    "SigLipLoss",
    "SimSiamLoss",
]

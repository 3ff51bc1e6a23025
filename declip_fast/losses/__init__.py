"""Losses users import: drop-ins for OpenCLIP's, backed by declip_fast.kernels."""

from declip_fast.losses.clip import ClipLoss
from declip_fast.losses.declip import DeCLIPLoss, DeCLIPLossConfig
from declip_fast.losses.nns import FeatureQueue, NNSLoss
from declip_fast.losses.ssl import MLMLoss, SimSiamLoss

__all__ = ["ClipLoss", "DeCLIPLoss", "DeCLIPLossConfig", "FeatureQueue", "MLMLoss", "NNSLoss", "SimSiamLoss"]

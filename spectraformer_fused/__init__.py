"""spectraformer_fused: fused random-feature attention for every component x weight matrix of the
Spectraformer framework."""

from .attention import BACKENDS, WINDOW_BACKENDS, available_backends, rf_attention
from .components import COMPONENTS, KERNELS, LEARNED_COMPONENTS
from .contract import FeatureParams
from .distributed import context_parallel_rf_attention, convert_sync_stats
from .feature_map import RandomFeatureMap
from .fitting import attention_distillation_loss, distill, fit_feature_map
from .modules import SpectraAttention
from .reference import exact_attention, exact_kernel
from .state import RFState, WindowState
from .weights import LEARNABLE_WEIGHTS, WEIGHTS

__version__ = "0.1.0"

__all__ = [
    "COMPONENTS",
    "WEIGHTS",
    "LEARNABLE_WEIGHTS",
    "KERNELS",
    "BACKENDS",
    "WINDOW_BACKENDS",
    "RandomFeatureMap",
    "FeatureParams",
    "RFState",
    "WindowState",
    "SpectraAttention",
    "available_backends",
    "rf_attention",
    "exact_attention",
    "exact_kernel",
    "LEARNED_COMPONENTS",
    "attention_distillation_loss",
    "fit_feature_map",
    "distill",
    "context_parallel_rf_attention",
    "convert_sync_stats",
]

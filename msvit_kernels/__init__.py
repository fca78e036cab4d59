"""Low-level ops of MSViT: packed varlen attention and mixed-scale token packing (no nn.Modules)."""
from .attention import BACKENDS, Backend, available_backends, packed_attention, register_backend
from . import backends as _backends  # noqa: F401  registers the triton, flash_attn and torch backends
from .varlen import MixedScaleIndex, cu_seqlens_from_lengths, mixed_scale_index

__all__ = [
    "BACKENDS",
    "Backend",
    "MixedScaleIndex",
    "available_backends",
    "cu_seqlens_from_lengths",
    "mixed_scale_index",
    "packed_attention",
    "register_backend",
]

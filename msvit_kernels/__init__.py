"""Low-level ops of MSViT: packed varlen attention and mixed-scale token packing (no nn.Modules)."""

from . import backends as _backends  # noqa: F401  registers the triton, flash_attn and torch backends
from .attention import BACKENDS, Backend, available_backends, packed_attention, register_backend
from .entropy_kernel import PatchEntropy, patch_entropy
from .gate_kernel import FusedGateOutput, fused_gate
from .index_kernel import triton_mixed_scale_index
from .pack_kernel import gather_embed_pack
from .unpack_kernel import triton_unpack_to_grid, unpack_to_grid
from .varlen import MixedScaleIndex, cu_seqlens_from_lengths, mixed_scale_index

__all__ = [
    "BACKENDS",
    "Backend",
    "FusedGateOutput",
    "MixedScaleIndex",
    "PatchEntropy",
    "available_backends",
    "cu_seqlens_from_lengths",
    "fused_gate",
    "gather_embed_pack",
    "mixed_scale_index",
    "packed_attention",
    "patch_entropy",
    "register_backend",
    "triton_mixed_scale_index",
    "triton_unpack_to_grid",
    "unpack_to_grid",
]

"""The model library, in data-flow order (docs/design.md, section 2):

1. ``gate``: the gate scores each coarse region from its pooled pixels -> a fine/coarse mask.
2. ``tokenizer``: one shared patch embedding over fine 16 px and coarse 32 px patches, gathered
   and packed into varlen sequences (``cu_seqlens``) by the Triton kernels of ``msvit_kernels``.
3. ``layers``: transformer blocks on the packed tokens (varlen attention, no padding).
4. ``mixed_scale_vit``: ``MSViT`` = gate -> tokenizer -> blocks -> pooled head, in packed,
   masked and trimmed modes; ``unpack_to_grid`` for dense heads.
5. Uses of the backbone: ``segmentation`` (Segmenter decoders), ``pruning`` (EViT on packed
   tokens); ``timm_compat`` builds an MSViT from a timm ViT; ``flops`` counts MACs;
   ``checks`` validates inputs for all of them.
"""

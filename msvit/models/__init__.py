"""The model library, in data-flow order (docs/design.md, section 2):

1. ``gate``: the gate scores each coarse region from its pooled pixels -> a fine/coarse mask.
   ``entropy_gate``: APT's training-free alternative (grey-level entropy > threshold -> fine).
2. ``tokenizer``: one shared patch embedding over fine 16 px and coarse 32 px patches, gathered
   and packed into varlen sequences (``cu_seqlens``) by the Triton kernels of ``msvit_kernels``;
   ``rope`` places rotary embeddings at mixed-scale token positions; ``aggregation``: APT's
   zero-initialised aggregation of sub-patch embeddings into coarse tokens (an option).
3. ``layers``: transformer blocks on the packed tokens (varlen attention, no padding);
   ``timm_blocks`` reads qkv and LayerScale from timm's ``Block`` and ``EvaBlock``.
4. ``mixed_scale_vit``: ``MSViT`` = gate -> tokenizer -> blocks -> pooled head, in packed,
   masked and trimmed modes; ``unpack_to_grid`` for dense heads; the heads of other families:
   ``attention_pool`` (SigLIP / PE ``map`` pooling), ``distilled`` (DeiT's dist head).
5. Uses of the backbone: ``segmentation`` (Segmenter decoders), ``pruning`` (EViT on packed
   tokens); ``flops`` counts MACs; ``checks`` validates inputs for all of them.
6. From timm: ``timm_compat.from_timm`` builds an MSViT after ``timm_names`` has checked the
   name's family and ``timm_support`` every module it replaces (``timm_parts``, ``naflex``: the
   embeddings of each family); a Swin v1 goes to ``swin``, the mixed-scale Swin (coarse regions
   skip the early stages).
"""

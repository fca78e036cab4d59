"""Distilled DeiT (timm's ``VisionTransformerDistilled``): a dist token after the cls token and a
second head on it.

The dist token is one more prefix token (packed rows ``prefix_rows[:, 1]``); pooling takes the cls
and dist rows (``[B, 2, C]``) and the heads follow timm's ``forward_head``: the mean of the two
heads' logits, except in training with ``distilled_training`` set, where both are returned
``(cls_logits, dist_logits)`` for a distillation loss. ``pre_logits`` is the mean of the two
features.
"""

from typing import Optional

from torch import Tensor, nn


def check_distilled(global_pool: str, num_prefix: int, head_dist: Optional[nn.Module]) -> None:
    """A distillation head reads the cls and dist prefix rows: 'token' pooling, two prefix tokens
    or more (timm builds distilled models without registers)."""
    if head_dist is None:
        return
    if global_pool != "token" or num_prefix < 2:
        raise ValueError(
            f"head_dist (distilled DeiT) needs global_pool='token' and the cls and dist prefix tokens, got "
            f"global_pool={global_pool!r} with {num_prefix} prefix token(s)"
        )


def distilled_head(model: nn.Module, x: Tensor, pre_logits: bool):
    """Logits of pooled cls/dist features ``x [B, 2, C]`` (head dropout already applied), as timm's
    ``VisionTransformerDistilled.forward_head``: ``[B, K]``, or a pair in distilled training."""
    cls_features, dist_features = x[:, 0], x[:, 1]
    if pre_logits:
        return (cls_features + dist_features) / 2
    logits, logits_dist = model.head(cls_features), model.head_dist(dist_features)
    if model.distilled_training and model.training:
        return logits, logits_dist
    return (logits + logits_dist) / 2

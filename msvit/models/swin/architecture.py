"""The architecture record of a mixed-scale Swin for ``config.json`` (see ``msvit.io.architecture``):
the choices that change outputs without changing tensor shapes (heads, windows, shifts, norms)."""

from msvit.io.architecture import layer


def describe_swin(model) -> dict:
    tok, gate = model.tokenizer, model.gate
    stages = []
    for stage in model.layers:
        first = stage.blocks[0] if len(stage.blocks) else None
        stages.append(
            {
                "depth": len(stage.blocks),
                "dim": None if first is None else first.dim,
                "num_heads": None if first is None else first.attn.num_heads,
                "scale": None if first is None else first.attn.scale,
                "windows": [list(b.window_size) for b in stage.blocks],
                "shifts": [list(b.shift_size) for b in stage.blocks],
                "mlp_hidden": None if first is None else first.mlp.fc1.out_features,
                "norm": None if first is None else layer(first.norm1),
                "downsample": layer(getattr(stage.downsample, "norm", None)),
            }
        )
    return {
        "type": "MixedScaleSwin",
        "in_chans": model.in_chans,
        "img_size": list(model.img_size),
        "patch_size": tok.fine_patch,
        "coarse_patch_size": tok.coarse_patch,
        "entry_stage": model.entry,
        "embed_norm": layer(tok.embed_norm),
        "stages": stages,
        "norm": layer(model.norm),
        "num_classes": model.num_classes,
        "gate": {"hidden": gate.fc1.out_features, "temperature": gate.temperature, "grid": list(gate.grid)},
    }

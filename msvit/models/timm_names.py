"""What a timm model name says before the model is built: its family, and the types its
constructor's parameters take.

``from_timm(name, timm_kwargs=...)`` passes ViT keyword arguments (``patch_size``, ``img_size``) to
``timm.create_model``; a model of another family (``resnet18``) then fails inside timm with
"unexpected keyword argument 'patch_size'" before ``check_model`` could say it is no ViT, so the
family is checked from the name first. A checkpoint's ``timm.kwargs`` with a number written as a
string (``"embed_dim": "32"``) fails inside timm with "not all arguments converted during string
formatting"; the parameter's annotation says what was expected.
"""

import collections.abc
import sys
import typing
from typing import Dict, Optional, Set, Tuple

from msvit.models.timm_support import EXPECTED, MODELS, REFUSED_MODELS

# The VLM towers' modules: from_timm converts them in msvit.models.vlm_families
VLM_MODULES = {"qwen3_vit", "deepseek_vit", "gemma4_vit"}
# The timm modules of the families from_timm takes, or refuses naming the feature it lacks once
# built (their classes take the ViT keyword arguments). Any other module is another family.
VIT_MODULES = {
    "vision_transformer",
    "deit",
    "eva",
    "naflexvit",
    "swin_transformer",
    "swin_transformer_v2",
    "beit",
    "vision_transformer_relpos",
    "vision_transformer_sam",
    "vision_transformer_hybrid",
} | VLM_MODULES
# NaFlexVitCfg: the dataclass NaFlexVit takes its architecture kwargs into
CLASSES = sorted(MODELS | set(REFUSED_MODELS) | {"NaFlexVitCfg", "SwinTransformer", "SwinTransformerV2"})
JSON_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def timm_module(name: str):
    """The timm module that defines model ``name`` (tags like ``.augreg_in21k`` allowed); None for a
    name timm's registry does not hold (hub and local names: timm resolves those itself)."""
    from timm.models import is_model, model_entrypoint

    return sys.modules[model_entrypoint(name).__module__] if is_model(name) else None


def is_vlm_tower(model_or_name) -> bool:
    """A timm VLM vision tower (``qwen3_vit_*``, ``deepseek_vit_*``, ``gemma4_vit_*``): its name, or
    a model of one of those modules' classes."""
    if isinstance(model_or_name, str):
        module = timm_module(model_or_name)
        return module is not None and module.__name__.rpartition(".")[2] in VLM_MODULES
    return type(model_or_name).__module__.rpartition(".")[2] in VLM_MODULES and type(
        model_or_name
    ).__module__.startswith("timm.")


def check_model_name(name: str) -> None:
    """A TypeError naming the family when ``name`` is a timm model of a family from_timm never takes."""
    module = timm_module(name)
    family = module.__name__.rpartition(".")[2] if module is not None else None
    if family is not None and family not in VIT_MODULES:
        raise TypeError(
            f"from_timm expects {EXPECTED} or a Swin v1; {name!r} is a timm {family} model (timm.models.{family})"
        )


def json_types(annotation) -> Optional[Set[type]]:
    """The JSON value types a parameter annotation admits (None: it does not say)."""
    if annotation in JSON_NAMES:
        return {annotation}
    if annotation is type(None):
        return {type(None)}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return {type(a) for a in args}
    if origin in (tuple, list, collections.abc.Sequence):
        return {list}
    if origin is typing.Union:
        parts = [json_types(a) for a in args]
        return None if any(p is None for p in parts) else set().union(*parts)
    return None


def parameter_types(name: str) -> Dict[str, Set[type]]:
    """{parameter: JSON types} of the constructors of the model classes in ``name``'s timm module."""
    import inspect

    module = timm_module(name)
    types: Dict[str, Set[type]] = {}
    for cls in (getattr(module, c) for c in CLASSES if module is not None and hasattr(module, c)):
        for parameter in inspect.signature(cls.__init__).parameters.values():
            admitted = json_types(parameter.annotation)
            if admitted is not None:
                types[parameter.name] = types.get(parameter.name, set()) | admitted
    return types


def misquoted_kwarg(name: str, kwargs: dict) -> Optional[Tuple[str, str]]:
    """(key, what it must be) of the first of ``kwargs`` that is a string where model ``name``'s
    constructor takes none (a quoted number or boolean), else None. Other types are left to timm."""
    types = parameter_types(name)
    for key, value in kwargs.items():
        admitted = types.get(key)
        if isinstance(value, str) and admitted and str not in admitted:
            return key, " or ".join(JSON_NAMES[t] for t in JSON_NAMES if t in admitted) or "no string"
    return None

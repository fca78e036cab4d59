"""Reading the JSON files of a checkpoint with errors that name the file and the key.

A truncated, hand-edited or foreign ``config.json`` must not surface as a bare ``JSONDecodeError``
or ``TypeError: list indices must be integers``: the user needs to know which file to fix and how.
"""

import json
from pathlib import Path


class ConfigError(ValueError):
    """A checkpoint file that is not what msvit wrote: says which file, which key, and why."""


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path`` (``what`` says what the file is for, in the messages)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; expected the {what}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not a text file ({error}); expected the {what} as JSON") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        detail = "it is empty" if not text.strip() else f"{error.msg} at line {error.lineno} column {error.colno}"
        raise ConfigError(f"{path} is not valid JSON ({detail}); expected the {what}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must hold a JSON object (the {what}), got a JSON {type(value).__name__}")
    return value


TYPE_NAMES = {dict: "an object", str: "a string", int: "an integer", list: "a list", bool: "true or false"}


def require(obj: dict, key: str, kind, path: Path, optional: bool = False, where: str = ""):
    """``obj[key]`` if it has type ``kind`` (bool is not accepted as int); raises ``ConfigError``
    naming ``path`` and the dotted key otherwise. Optional keys give None when absent."""
    name = f"{where}{key}"
    if key not in obj:
        if optional:
            return None
        raise ConfigError(f"{path}: missing key {name!r}")
    value = obj[key]
    wrong_bool = kind is int and isinstance(value, bool)
    if not isinstance(value, kind) or wrong_bool:
        raise ConfigError(
            f"{path}: key {name!r} must be {TYPE_NAMES.get(kind, kind.__name__)}, "
            f"got {type(value).__name__} {value!r:.60}"
        )
    return value

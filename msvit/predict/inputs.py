"""The images ``msvit predict`` reads: files as given, folders searched for images, globs expanded.

A folder yields the files under it with an image extension (timm's list), sorted, so a README or
a ``.json`` beside the photos is not an error. A file named on the command line (or matched by a
glob) is read whatever its extension: if it is not an image, that is the user's to hear about.
"""

import glob
from pathlib import Path
from typing import List, NamedTuple

# timm.data.readers.img_extensions.IMG_EXTENSIONS, spelled here so the folder search does not
# depend on a private timm module.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
GLOB_CHARACTERS = "*?["


class Inputs(NamedTuple):
    """files: paths to read, in order (as given, or folder/relative); problems: one message per
    argument that named nothing readable."""

    files: List[str]
    problems: List[str]


def expand(arguments) -> Inputs:
    """Files, folders (recursively, image extensions only) and globs (``**`` recurses) -> ``Inputs``."""
    files, problems = [], []
    for argument in arguments:
        path = Path(argument)
        if path.is_file():
            files.append(argument)
        elif path.is_dir():
            found = folder_images(path)
            files.extend(found)
            if not found:
                problems.append(f"{argument}: a folder with no image files ({', '.join(IMAGE_EXTENSIONS)})")
        elif any(c in argument for c in GLOB_CHARACTERS):
            matches = sorted(glob.glob(argument, recursive=True))
            for match in matches:
                files.extend(folder_images(Path(match)) if Path(match).is_dir() else [match])
            if not matches:
                problems.append(f"{argument}: no file matches this pattern")
        else:
            problems.append(f"{argument}: no such file or folder")
    return Inputs(files, problems)


def folder_images(folder: Path) -> List[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_image(path: str):
    """The file as a loaded PIL image; ``ValueError`` naming the file when it is not a readable image
    (PIL opens lazily: ``load`` decodes now, so a truncated file fails here, not in the transform)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file (PIL cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
        raise ValueError(f"{path}: cannot read this image ({type(error).__name__}: {error})") from None

"""``msvit train`` on the command line: parse, train, and show the user's mistakes as messages."""

from ..config_file import ConfigError
from ..run_folder import RunFolderError
from .loop import train
from .options import parse_args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except (RunFolderError, ConfigError) as error:  # the user's folder or files: a message, no traceback
        raise SystemExit(f"msvit train: {error}") from None

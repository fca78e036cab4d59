"""``msvit train`` on the command line: parse, train, and show the user's mistakes as messages."""

from msvit.io.config_file import ConfigError
from msvit.train.loop import train
from msvit.train.options import parse_args
from msvit.train.run_folder import RunFolderError


def main(argv=None) -> None:
    try:
        train(parse_args(argv))  # a resume reads its run's flags while parsing
    except (RunFolderError, ConfigError) as error:  # the user's folder or files: a message, no traceback
        raise SystemExit(f"msvit train: {error}") from None

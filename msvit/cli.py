"""The ``msvit`` command: ``msvit train ...`` (``msvit <command> --help`` for options)."""

import sys

COMMANDS = {
    "train": ("msvit.train", "train or fine-tune an MSViT and its gate"),
    "visualize": ("msvit.visualize.cli", "draw the gate's mixed-scale masks (and predicted maps) for images"),
    "predict": ("msvit.predict.cli", "top-k classes of image files, folders and globs (CSV or JSON)"),
    "export": ("msvit.predict.export_cli", "package a static forward with torch.export and AOTInductor (.pt2)"),
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10}{help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: msvit <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        return
    module = __import__(COMMANDS[argv[0]][0], fromlist=["main"])
    module.main(argv[1:])


if __name__ == "__main__":
    main()

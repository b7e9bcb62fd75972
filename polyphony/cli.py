"""The ``polyphony`` command: ``polyphony serve [options]`` starts the web studio."""

from __future__ import annotations

import sys

COMMANDS = {"serve": "start the local web studio (polyphony/serve.py)"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        lines = [f"  {name:8} {text}" for name, text in COMMANDS.items()]
        print("usage: polyphony COMMAND [options]\n" + "\n".join(lines), file=sys.stderr)
        return 2
    try:
        from .serve import main as serve
    except ImportError as err:  # the studio's extra is not installed
        print(f"error: {err}", file=sys.stderr)
        return 2
    return serve(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

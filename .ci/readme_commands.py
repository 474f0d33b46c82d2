"""Print README.md's two set-up commands, one per line: the set-up command, then the test command.

They are the command lines (not comments) of the first ```bash block under "## Set up". .ci/run
runs exactly these lines, so the README and CI cannot drift apart. Standard library only: CI runs
this before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def readme_commands(readme: str) -> list[str]:
    section = re.search(r"^## Set up\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    block = section and re.search(r"^```(?:bash|sh)\n(.*?)^```", section.group(1), re.S | re.M)
    if not block:
        raise ValueError("README.md has no ```bash block under '## Set up'")
    lines = [line.strip() for line in block.group(1).splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    if len(commands) != 2:
        raise ValueError(f"README.md's set-up block has {len(commands)} commands, expected 2 (set-up, tests)")
    return commands


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "README.md")
    try:
        print("\n".join(readme_commands(path.read_text(encoding="utf-8"))))
    except (OSError, ValueError) as e:
        print(f"readme_commands: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The README's set-up commands, as .ci/run reads them: found, and every gpt2lab step in them valid.

CI runs the set-up command for real (.ci/run); these checks run with every `python -m pytest` and
catch a renamed flag, recipe or path in the README before CI spends minutes on it.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2lab.cli import build_parser
from gpt2lab.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def readme_commands_module():
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def steps(command: str) -> list[list[str]]:
    return [shlex.split(part) for part in command.split("&&")]


def test_ci_reads_the_set_up_and_test_commands_from_the_readme():
    out = subprocess.run(
        [sys.executable, ".ci/readme_commands.py", "README.md"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    setup, tests = out.stdout.splitlines()
    assert steps(setup)[0] == ["pip", "install", "-e", ".[dev]"]
    assert tests == "python -m pytest"
    run = (ROOT / ".ci" / "run").read_text()
    assert "readme_commands.py README.md" in run and 'bash -o pipefail -c "$setup"' in run


def test_every_gpt2lab_step_of_the_quick_start_parses_and_the_recipe_reads_what_prepare_writes():
    setup = readme_commands_module().readme_commands((ROOT / "README.md").read_text())[0]
    gpt2lab_steps = [s[1:] for s in steps(setup) if s[0] == "gpt2lab"]
    assert [s[0] for s in gpt2lab_steps] == ["prepare", "train"]
    parser = build_parser()
    prepare, train = (parser.parse_args(s) for s in gpt2lab_steps)
    data = getattr(train, "data", None) or load_recipe(train.recipe)["data"]
    assert Path(data) == Path(prepare.out)


@pytest.mark.parametrize(
    "readme, problem",
    [
        ("# x\n\n## Set up\n\nNo commands.\n", "no ```bash block"),
        ("## Set up\n\n```bash\n# only a comment\npip install .\n```\n", "has 1 commands, expected 2"),
        ("## Other\n\n```bash\na\nb\n```\n", "no ```bash block"),
    ],
)
def test_a_readme_without_the_two_commands_fails_ci_with_a_reason(readme, problem):
    with pytest.raises(ValueError, match=problem):
        readme_commands_module().readme_commands(readme)

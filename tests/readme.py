"""The commands of README.md, read out of its ```bash and ```python blocks, for the tests that run
them (tests/e2e/test_readme.py says which test runs which command), so the README cannot drift."""

from __future__ import annotations

import re
import shlex
import sys

from conftest import BIN, REPO

README = REPO / "README.md"


def readme_commands() -> list[str]:
    """The shell commands of the README's ```bash blocks (comments dropped) and one entry per
    ```python block, named by what it uses."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for lang, body in re.findall(r"^```(bash|python)\n(.*?)^```", text, re.S | re.M):
        if lang == "python":
            commands.append("python: openai client" if "OpenAI(" in body else f"python: {body.splitlines()[0]}")
            continue
        for line in body.splitlines():
            line = re.sub(r"\s{2,}#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def readme_command(prefix: str) -> str:
    """The one README command starting with ``prefix`` (so a test runs the README's exact words)."""
    commands = readme_commands()
    # Exactly, else without its optional [...] arguments (`lmforge tune CONFIG` is not `lmforge tune CONFIG --resume`),
    # else as a prefix.
    found = ([c for c in commands if c == prefix] or [c for c in commands if c.split(" [")[0] == prefix]
             or [c for c in commands if c.startswith(prefix)])
    assert len(found) == 1, f"README.md has {len(found)} commands starting with {prefix!r}: {found}"
    return found[0]


def python_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    return next(body for body in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M) if "OpenAI(" in body)


def argv(command: str, **fill: str) -> list[str]:
    """The command as an argument list: placeholders filled, optional ``[...]`` arguments kept
    (with their values filled), console scripts taken from this environment."""
    command = re.sub(r"\[([^\]]+)\]", r"\1", command)
    for placeholder, value in fill.items():
        command = command.replace(placeholder, value)
    words = shlex.split(command)
    if words[0] == "lmforge":
        words[0] = str(BIN / "lmforge")
    elif words[0] == "python":
        words[0] = sys.executable
    return words

"""Every command of the READMEs that reads the committed records runs as written, on a fresh clone; every other
`python SCRIPT` they name exists."""
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

READMES = [ROOT / "README.md", ROOT / "records" / "README.md", *sorted(ROOT.glob("records/*/README.md"))]


def commands() -> list[tuple[str, str]]:
    """(README, command) for each `python ...` in a code block or in backquotes, comments dropped."""
    found = []
    for readme in READMES:
        text = readme.read_text()
        blocks = re.findall(r"```(?:bash)?\n(.*?)```", text, re.S)
        lines = [l for block in blocks for l in block.splitlines()] + re.findall(r"`(python [^`]+)`", text)
        for line in lines:
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line.startswith("python "):
                found.append((readme.relative_to(ROOT).as_posix(), line))
    return found


READS_RECORDS = [(r, c) for r, c in commands()
                 if c.startswith("python tools/compare.py") or c.startswith("python tools/ab.py --table")]


def test_the_readmes_name_commands_that_read_the_records():
    assert len(READS_RECORDS) >= 8
    assert {r for r, _ in READS_RECORDS} >= {"README.md", "records/README.md"}


@pytest.mark.parametrize("readme, command", READS_RECORDS, ids=[c[len("python tools/"):][:60] for _, c in READS_RECORDS])
def test_a_command_that_reads_the_records_runs_as_written(readme, command, tmp_path):
    for folder in ("records", "tools"):  # as from the repository root; files written land here
        (tmp_path / folder).symlink_to(ROOT / folder)
    args = shlex.split(command)
    result = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{readme}: {command}\n{result.stderr[-1500:]}"
    assert "error" not in result.stderr and "skipped" not in result.stderr, result.stderr
    assert "|" in result.stdout  # a table


def test_every_other_python_command_names_a_script_that_exists():
    for readme, command in commands():
        script = shlex.split(command)[1]
        assert script.startswith("-") or (ROOT / script).is_file(), f"{readme}: {command}"

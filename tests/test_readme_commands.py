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


def unique(commands: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{command: the READMEs that name it}, whitespace normalised; a command that is another one plus --plot
    counts as that one (the plot is the only difference), so each runs once."""
    found = {}
    for readme, command in commands:
        found.setdefault(" ".join(command.split()), []).append(readme)
    for command in [c for c in found if " --plot " in c]:
        plain = command[:command.index(" --plot ")]
        if plain in found:
            found[command] += found.pop(plain)
    return found


READS_RECORDS = unique([(r, c) for r, c in commands()
                        if c.startswith(("python tools/compare.py", "python tools/ab.py --table"))
                        or re.fullmatch(r"python records/[^ ]+/analyze\.py", c)])

# The figures that the READMEs quote beside a command: (as the command prints it, as a README naming it quotes it)
QUOTED = {
    "python tools/ab.py --table records/2026-12-07_DataOrderCPU/equal_time": [
        ("| mean difference of final val (paired) | +0.0560 ± 0.0111 |", "0.0560 ± 0.0111"),
        ("| paired t-test | t = 12.36, p = 6.15e-05 |", "p = 6.2e-5"),
        ("| 95% interval of the mean difference (paired t) | [+0.0443, +0.0676] |", "[+0.0443, +0.0676]")],
    "python tools/ab.py --table records/2026-12-07_DataOrderCPU/per_token": [
        ("| mean difference of final val (paired) | -0.0293 ± 0.0063 |", "0.0293 ± 0.0063"),
        ("| paired t-test | t = -11.42, p = 9.02e-05 |", "p = 9.0e-5")],
    "python tools/ab.py --table records/2026-11-30_MoEvsTunedDenseCPU/confirm": [
        ("| mean difference of final val (paired) | -0.0211 ± 0.0165 |", "0.0211 ± 0.0165"),
        ("| paired t-test | t = -3.13, p = 0.0258 |", "p = 0.026")],
    "python tools/ab.py --table records/2026-11-30_MoEvsTunedDenseCPU/equal_time": [
        ("| paired t-test | t = 1.48, p = 0.198 |", "p = 0.20")],
    'python tools/compare.py records/2026-11-29_OpenEnglishCPU --group --baseline "dense scale0.01"': [
        ("| dense | 3 | +0.1183 | 7.36e-05 |", "0.118")],
    'python tools/compare.py records/2026-11-30_MoEvsTunedDenseCPU/confirm records/2026-11-30_MoEvsTunedDenseCPU/'
    'equal_time --group --baseline "dense scale0.01 (num_iterations=500"': [
        ("val_loss_every=250, warmdown_iters=144) | 6 | 4.3409 | 0.1727 |", "| 0.1727 |"),
        ("val_loss_every=625, warmdown_iters=180) | 6 | 4.2168 | 0.0831 |", "| 0.0831 |")],
    'python tools/compare.py records/2026-12-07_DataOrderCPU/val131k --group --baseline "dense scale0.01 '
    '(num_iterations=500"': [
        ("(num_iterations=500, warmdown_iters=144) | 6 | 3.9404 | 0.0019 |", "**0.0019**"),
        ("(num_iterations=625, warmdown_iters=180) | 6 | 3.8761 | 0.0057 |", "**0.0057**")],
}


def test_the_readmes_name_commands_that_read_the_records():
    assert len(READS_RECORDS) >= 8
    assert {r for readmes in READS_RECORDS.values() for r in readmes} >= {"README.md", "records/README.md"}
    assert set(QUOTED) <= set(READS_RECORDS)  # every quoted figure's command is still in a README


@pytest.mark.parametrize("command", READS_RECORDS, ids=[c[len("python "):][:60] for c in READS_RECORDS])
def test_a_command_that_reads_the_records_runs_as_written_and_prints_what_the_readmes_quote(command, tmp_path):
    for folder in ("records", "tools"):  # as from the repository root; files written land here
        (tmp_path / folder).symlink_to(ROOT / folder)
    result = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"{READS_RECORDS[command]}: {command}\n{result.stderr[-1500:]}"
    assert "error" not in result.stderr and "skipped" not in result.stderr, result.stderr
    assert "|---|" in result.stdout  # a table
    texts = "\n".join((ROOT / readme).read_text() for readme in READS_RECORDS[command])
    for printed, quoted in QUOTED.get(command, []):
        assert printed in result.stdout, f"{command} no longer prints {printed!r}"
        assert quoted in texts, f"{READS_RECORDS[command]} no longer quote {quoted!r} beside {command}"


def test_every_other_python_command_names_a_script_that_exists():
    for readme, command in commands():
        script = shlex.split(command)[1]
        assert script.startswith("-") or (ROOT / script).is_file(), f"{readme}: {command}"

"""Every code block of docs/readme-integrations.md runs as written."""

import re
from pathlib import Path

import pytest

from jgc._src import cli

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "readme-integrations.md"


def blocks(lang):
    """(section heading, code) for every ```lang block of the document."""
    text = DOC.read_text()
    out = []
    for m in re.finditer(rf"```{lang}\n(.*?)```", text, flags=re.S):
        heading = re.findall(r"^## (.+)$", text[: m.start()], flags=re.M)[-1]
        out.append(pytest.param(m.group(1), id=heading.split(":")[0].lower().replace(" ", "-")))
    return out


@pytest.mark.parametrize("code", blocks("python"))
def test_readme_python_blocks_run_as_written(code, tmp_path, monkeypatch, capsys):
    if ".plot(" in code:
        pytest.importorskip("matplotlib", reason="the plot block needs the plot extra (jgc[plot])")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {"__name__": "readme_block"})
    out = capsys.readouterr().out
    assert "False" not in out  # every verdict the block prints is True
    if ".plot(" in code:
        assert (tmp_path / "gradcheck.png").stat().st_size > 10_000


@pytest.mark.parametrize("code", blocks("bash"))
def test_readme_command_lines_run_as_written(code, monkeypatch, capsys):
    """In-process (tests/test_cli.py runs the real `python -m jgc` process)."""
    argv = code.replace("\\\n", " ").split()
    assert argv[0] == "jgc"
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    code = cli.main(argv[1:])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "jgc.check PASS" in out

"""The README's set-up commands are what CI runs, and its Python blocks run as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert len(first) == 2
    install_demo, install_test = (line.split("#")[0].strip() for line in first)
    assert install_demo == "pip install . && jgc demo"
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_test in ci


def test_readme_python_blocks_run_in_order(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 4
    namespace = {"__name__": "__main__"}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    # The quickstart prints True for jax.grad and a failing report for the stray factor.
    assert out.startswith("True\njgc.check FAIL: ") and "2 mismatch" in out.splitlines()[1]
    assert "['b']  mismatch" in out
    assert namespace["train_step"].reports[0][1].ok

"""The README stays true: CI runs its test command, and it documents every environment
variable the package reads."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line for b in blocks for line in b.splitlines()]


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = next(c for c in _commands() if "run_installed.sh" in c)
    assert test_cmd in (ROOT / ".ci" / "run").read_text().splitlines()
    script = (ROOT / "tests" / "run_installed.sh").read_text()
    assert '-m pytest -q -c "$repo/pyproject.toml" --rootdir "$repo" "$repo/tests"' in script


def test_every_environment_variable_read_is_documented():
    readme = (ROOT / "README.md").read_text()
    used = set()
    for folder in ("reasoncache", "kernels"):
        for f in (ROOT / folder).rglob("*.py"):
            used |= set(re.findall(r"""environ(?:\.get)?\(\s*["']([A-Z_]+)["']""", f.read_text()))
            used |= set(re.findall(r"""environ\[["']([A-Z_]+)["']\]""", f.read_text()))
            used |= set(re.findall(r'ENV_VAR = "([A-Z_]+)"', f.read_text()))
    # set by torchrun or by the package itself for offline loading, not user settings
    used -= {"WORLD_SIZE", "LOCAL_RANK"}
    missing = [v for v in sorted(used) if f"`{v}`" not in readme]
    assert not missing, f"README's environment-variable table lacks {missing}"

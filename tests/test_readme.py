"""README.md tells the truth about the flags and the set-up commands."""
import re

from dtrain.config import flags_markdown
from helpers import REPO

README = (REPO / "README.md").read_text()


def test_flags_table_is_current():
    assert flags_markdown() in README, "README's flags table is stale: paste `python -m dtrain.config` into it"


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_them():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    train_cmd, test_cmd = (line.split("#")[0].strip() for line in first_block)
    assert train_cmd.startswith("pip install -e .") and "dtrain/main.py" in train_cmd
    ci = (REPO / ".ci" / "run").read_text()
    for part in test_cmd.split("&&"):
        part = part.strip().replace("pip install", "python3 -m pip install --quiet").replace("python -m", "python3 -m")
        assert part in ci, f"{part!r} (README's test command) is not what .ci/run runs"

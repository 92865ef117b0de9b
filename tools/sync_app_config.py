"""Rewrite pyproject.toml's [tool.flwr.app.config] from src/hfedmoe/defaults.toml.

defaults.toml is the one place defaults live; `flwr run .` reads pyproject.toml, so the table
there is generated. Run after changing defaults:  .venv/bin/python tools/sync_app_config.py
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "# --- generated from src/hfedmoe/defaults.toml by tools/sync_app_config.py ---"


def main() -> None:
    lines = []
    for line in (ROOT / "src/hfedmoe/defaults.toml").read_text().splitlines():
        if line.startswith("#"):
            continue
        table = re.match(r"^\[([\w-]+)\]$", line)
        lines.append(f"[tool.flwr.app.config.{table.group(1)}]" if table else line)
    pyproject = ROOT / "pyproject.toml"
    head = pyproject.read_text().split(MARKER)[0].rstrip() + "\n\n"
    body = "\n".join(lines).strip()
    pyproject.write_text(f"{head}{MARKER}\n[tool.flwr.app.config]\n{body}\n")


if __name__ == "__main__":
    main()

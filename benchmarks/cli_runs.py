"""What the benchmark scripts share: the repository and data paths, and one ``main.py`` run per measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def run_cli(args: list[str], root: Path, reuse: bool) -> dict:
    """``python main.py ARGS`` writing into ``root`` (its own process, so its peak memory is its own), and the
    ``summary.json`` it leaves there; with ``reuse``, an existing summary in ``root`` is returned without running."""
    summary = root / "summary.json"
    if not (reuse and summary.exists()):
        cmd = [sys.executable, "main.py", *args, "--trainer.default_root_dir", str(root)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    return json.loads(summary.read_text())

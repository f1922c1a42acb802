"""The README's commands, run as written (on synthetic data), so the front door cannot rot.

Every ```bash block runs in order in one bash process, in a temporary working folder with its own
TLSERVE_HOME and BENTOML_HOME, the venv's `tlserve` first on PATH and port 3000 swapped for a free
one. Blocks that call scripts/ are what CI itself runs (.ci/run -> scripts/test.sh, and the demo
in its own test), so they are skipped here; the container image is built by the container tier.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, free_port

README = ROOT / "README.md"
SKIP = (re.compile(r"^bash scripts/"), re.compile(r"^tlserve build\b"))


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def runnable(block: str) -> bool:
    lines = [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return bool(lines) and not all(any(p.search(ln) for p in SKIP) for ln in lines)


def test_every_readme_command_block_runs(tmp_path):
    blocks = [b for b in bash_blocks(README.read_text(encoding="utf-8")) if runnable(b)]
    assert len(blocks) >= 4, "the README lost its command blocks"
    port = str(free_port())
    script = "\n".join(["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT",
                        *(re.sub(r"\b3000\b", port, b) for b in blocks)])
    env = {**os.environ, "TLSERVE_HOME": str(tmp_path), "BENTOML_HOME": str(tmp_path / "bentoml"),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '"top"' in result.stdout  # the curl answer

"""Run a snippet in a fresh interpreter: what an import pulls in can only be seen in a new process."""
from __future__ import annotations

import subprocess
import sys


def run_fresh(code: str, timeout: float = 120) -> None:
    """Run ``code`` with ``python -c``; fail with its output unless it exits 0 (``sys.exit("why")`` to fail)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr + result.stdout

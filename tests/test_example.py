"""The products example runs from a clean state and proves that no stale page was served."""

import os
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "examples" / "products" / "run_demo.py"


def test_products_demo_serves_fresh_pages_from_the_cache():
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, str(DEMO)],
        cwd=DEMO.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "stale pages served: 0" in out and "STALE" not in out
    assert "served from the cache" in out and "rendered by the view" in out
    assert "a cached page expires in 300 s" in out
    # The fresh list after the two writes: the save and the manager's update().
    assert "<li>apple: 1.50</li>\n<li>banana: 0.50</li>\n<li>cherry: 2.75</li>" in out
    assert "pages served from the cache: 5, rendered: 6" in out

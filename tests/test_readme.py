"""The README's result tables are exactly what the committed JSON of bench/results/ says."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_match_the_results_json():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "readme_tables.py"), "--check"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = (ROOT / "README.md").read_text()
    assert text.count("<!-- table: ") == text.count("<!-- /table -->") >= 5

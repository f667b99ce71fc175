"""The README's generated sections are what the committed result JSONs give."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import report  # noqa: E402


def test_readme_matches_the_result_files():
    r = subprocess.run([sys.executable, "benchmarks/report.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_render_replaces_only_the_blocks():
    text = ("intro\n<!-- report:quality -->\nstale\n<!-- /report:quality -->\nmiddle\n"
            "<!-- report:performance -->\n<!-- /report:performance -->\nend\n")
    out = report.render(text)
    assert out.startswith("intro\n<!-- report:quality -->\n") and "stale" not in out
    assert "\nmiddle\n" in out and out.endswith("<!-- /report:performance -->\nend\n")
    assert report.render(out) == out  # idempotent

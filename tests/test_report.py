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


def _demo_record() -> dict:
    return {"device": "cpu", "date": "2026-12-04T15:00:00+00:00", "command": "launch/demo.py --out d", "wall_s": 90.4,
            "seconds": {"synthetic cells": 5.0, "convert": 5.0, "pretrain": 70.0, "export": 0.0, "embed": 4.0},
            "steps": 200, "cells_per_s": 150.0, "tokens_per_s": 20000, "reused": [],
            "threads": {"torch": 2, "OMP_NUM_THREADS": None, "usable_cores": 2, "load_avg_1min_at_start": 0.5},
            "first_losses": {"mlm": 3.0}, "final_losses": {"mlm": 1.0}}


def test_demo_line_says_threads_and_reuse(monkeypatch):
    r = _demo_record()
    monkeypatch.setattr(report, "load", lambda name: r)
    line = report.demo()
    assert "90 s in all" in line and "OMP_NUM_THREADS unset, torch on 2 thread(s) of 2 usable cores" in line
    assert "reused" not in line
    r["reused"] = ["synthetic cells", "convert", "pretrain"]
    assert "pretraining reused from an earlier invocation" in report.demo()


def test_demo_line_gives_cells_and_sequences_and_says_a_corrected_rate(monkeypatch):
    r = {**_demo_record(), "cells_per_s": 150.0, "sequences_per_s": 300.0}
    monkeypatch.setattr(report, "load", lambda name: r)
    assert "150 cells/s = 300 sequences/s of two views per cell" in report.demo()
    assert "halved" not in report.demo()
    r["cells_per_s_corrected"] = "halved from the 300.0 cells/s logged before issue 21"
    assert "The cell rate is the logged 300 halved" in report.demo()

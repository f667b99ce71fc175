"""Shared fixtures: where the real data lives (tests skip cleanly without it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU (set before any import of them)
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REFUSED_FILE = "scdcc_10X_PBMC_top2000.h5ad"


def real_h5ad_files() -> list[Path]:
    """The real count files a converter must accept (all but the one without gene ids)."""
    folder = SHARED_DATA / "h5ad"
    return sorted(p for p in folder.glob("*.h5ad") if p.name != REFUSED_FILE) if folder.is_dir() else []


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "h5ad").is_dir():
        pytest.skip("../shared/data is not present (real-data tests run where it is)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _no_cli_logging_left():
    """A test calling a CLI's ``main`` in-process sets up logging for the whole process (a handler on
    the root logger, the project loggers' levels): undo it, so that the next test sees the library's
    defaults (nothing printed)."""
    yield
    from data_pipeline.log_setup import reset_logging

    reset_logging()

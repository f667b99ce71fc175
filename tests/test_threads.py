"""Per-process thread choice and the DeepSpeed extension cache (pretrain/threads.py), and the
entry points that use them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.cores import cgroup_cpu_limit, usable_cores
from pretrain.config import load_config
from pretrain.threads import (
    ThreadChoice,
    apply_threads,
    choose_threads,
    local_ranks,
    use_project_extension_dir,
)

ROOT = Path(__file__).resolve().parents[1]
SIXTEEN = set(range(16))


@pytest.fixture
def no_cgroup(tmp_path):
    """A cgroup mount with no CPU files: no quota."""
    root = tmp_path / "cgroup"
    root.mkdir()
    return root


def v2(tmp_path, text: str) -> Path:
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "cpu.max").write_text(text + "\n")
    return root


def test_affinity_alone(no_cgroup):
    assert usable_cores(SIXTEEN, no_cgroup) == (16, "16 cores in the affinity mask")
    assert choose_threads(env={}, affinity=SIXTEEN, cgroup_root=no_cgroup).threads == 16
    assert choose_threads(env={}, affinity={3}, cgroup_root=no_cgroup).threads == 1


def test_cgroup_v2_quota_caps_the_affinity(tmp_path):
    assert cgroup_cpu_limit(v2(tmp_path, "max 100000")) is None
    root = tmp_path / "q"
    root.mkdir()
    (root / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(root) == 1.5
    choice = choose_threads(env={}, affinity=SIXTEEN, cgroup_root=root)
    assert choice.threads == 2 and "quota of 1.5 cores" in choice.reason  # rounded up
    # a quota above the affinity changes nothing
    (root / "cpu.max").write_text("3200000 100000\n")
    assert choose_threads(env={}, affinity={0, 1}, cgroup_root=root).threads == 2


def test_cgroup_v1_quota(tmp_path):
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("300000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 3.0
    assert choose_threads(env={}, affinity=SIXTEEN, cgroup_root=tmp_path).threads == 3
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no quota"
    assert cgroup_cpu_limit(tmp_path) is None


def test_local_ranks_share_the_cores(no_cgroup):
    assert local_ranks({}) == 1
    assert local_ranks({"LOCAL_WORLD_SIZE": "4"}) == 4  # torchrun
    assert local_ranks({"LOCAL_SIZE": "8"}) == 8  # the deepspeed launcher
    assert local_ranks({"LOCAL_WORLD_SIZE": "junk", "LOCAL_SIZE": "2"}) == 2
    choice = choose_threads(env={"LOCAL_WORLD_SIZE": "4"}, affinity=SIXTEEN, cgroup_root=no_cgroup)
    assert choice.threads == 4 and "4 ranks" in choice.reason
    # more ranks than cores: still one thread each
    assert choose_threads(env={"LOCAL_SIZE": "32"}, affinity=SIXTEEN, cgroup_root=no_cgroup).threads == 1


def test_loader_workers(no_cgroup):
    # torch's DataLoader runs each worker on one thread; a rank with cores to spare keeps one for each
    choice = choose_threads(loader_workers=2, env={}, affinity=SIXTEEN, cgroup_root=no_cgroup)
    assert choice.threads == 14 and "- 2 for 2 loader worker(s)" in choice.reason
    # but at most a quarter of its cores: the workers mostly wait on a full prefetch queue
    choice = choose_threads(loader_workers=1, env={}, affinity={0, 1}, cgroup_root=no_cgroup)
    assert choice.threads == 2 and "loader" not in choice.reason
    assert choose_threads(loader_workers=4, env={}, affinity=set(range(6)), cgroup_root=no_cgroup).threads == 5
    assert choose_threads(loader_workers=2, env={"LOCAL_SIZE": "2"}, affinity=set(range(8)),
                          cgroup_root=no_cgroup).threads == 3


def test_explicit_choices_win(no_cgroup):
    env = {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "8"}
    choice = choose_threads(env=env, affinity=SIXTEEN, cgroup_root=no_cgroup)
    assert choice.threads == 3 and "OMP_NUM_THREADS=3" in choice.reason
    assert choose_threads(5, env=env, affinity=SIXTEEN, cgroup_root=no_cgroup).threads == 5  # run.threads / --threads
    # a value OpenMP would ignore too: choose as if unset
    assert choose_threads(env={"OMP_NUM_THREADS": "many"}, affinity={0, 1}, cgroup_root=no_cgroup).threads == 2
    with pytest.raises(ValueError, match="threads must be >= 0"):
        choose_threads(-1)


def test_config_key(tmp_path):
    assert load_config(None, []).run.threads == 0
    assert load_config(None, ["run.threads=3"]).run.threads == 3
    with pytest.raises(ValueError, match="run.threads"):
        load_config(None, ["run.threads=-2"])


def test_apply_sets_torch_and_logs(monkeypatch):
    before = torch.get_num_threads()
    lines = []
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        choice = apply_threads(log=lines.append)
        assert torch.get_num_threads() == 1 == choice.threads
        assert lines == ["torch threads: 1 (OMP_NUM_THREADS=1 from the environment)"]
    finally:
        torch.set_num_threads(before)


def test_extension_dir_per_project(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")  # a checkout
    env = {}
    assert use_project_extension_dir(env, repo=tmp_path) == str(tmp_path / ".cache" / "torch_extensions")
    assert env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / ".cache" / "torch_extensions")
    env = {"TORCH_EXTENSIONS_DIR": "/elsewhere"}
    assert use_project_extension_dir(env, repo=tmp_path) == "/elsewhere"  # the user's choice is kept


def test_extension_dir_of_an_installed_package_is_torchs_default(tmp_path):
    """Installed (`pip install .`), the package's parent is site-packages: nothing is built there."""
    env = {}
    assert use_project_extension_dir(env, repo=tmp_path / "site-packages") is None
    assert "TORCH_EXTENSIONS_DIR" not in env


PROBE = """
import importlib.util, json, os, sys, torch
spec = importlib.util.spec_from_file_location("launch_pretrain", "launch/pretrain.py")
entry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(entry)
seen = {}
def fake_train(config, resume, restart_epoch=False):  # what the real one would start with
    seen.update(threads=torch.get_num_threads(), ext=os.environ["TORCH_EXTENSIONS_DIR"])
    return {}
entry.train = fake_train
entry.main(["--config", "launch/configs/tiny.yaml", *json.loads(sys.stdin.read())])
print(json.dumps(seen))
"""


@pytest.mark.parametrize("overrides, env, expect", [
    (["run.threads=3"], {}, 3),  # the config key
    ([], {"OMP_NUM_THREADS": "2"}, 2),  # the user's environment
    ([], {"LOCAL_WORLD_SIZE": "64"}, 1),  # automatic: more local ranks than cores
])
def test_pretrain_entry_point_sets_threads(overrides, env, expect):
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR")}
    out = subprocess.run([sys.executable, "-c", PROBE], input=json.dumps(overrides), capture_output=True, text=True,
                         cwd=ROOT, env={**clean, **env, "PYTHONPATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["threads"] == expect
    assert seen["ext"] == str(ROOT / ".cache" / "torch_extensions")
    assert f"torch threads: {expect} (" in out.stderr


def _demo_module():
    spec = importlib.util.spec_from_file_location("launch_demo", ROOT / "launch" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_says_when_pretraining_was_reused(tmp_path, monkeypatch, capsys):
    """A second demo over a finished run trains nothing: its throughput is the earlier run's, and
    the printout and the JSON say so (they used to present it as new)."""
    demo = _demo_module()
    out = tmp_path / "demo"
    for name in ("cells.h5ad", "held_out.h5ad"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("")
    (out / "corpus").mkdir()
    (out / "corpus" / "manifest.json").write_text("{}")
    (out / "run").mkdir()
    (out / "run" / "metrics.json").write_text(json.dumps([{"loss": 3.0, "mlm": 2.0}]))
    final = {"loss": 1.0, "mlm": 0.5, "cells_per_s": 10.0, "tokens_per_s": 100.0}
    monkeypatch.setattr(demo, "train", lambda config, resume: {
        "steps": 5, "resumed_from_step": 5, "skipped_steps": 0, "device": "cpu", "final": final, "mlflow_tracking_uri": None})
    monkeypatch.setattr(demo, "apply_threads", lambda *a: ThreadChoice(1, "test"))
    monkeypatch.setattr(demo, "export_bundle", lambda run, bundle: bundle)
    monkeypatch.setattr(demo, "load_pretrained", lambda bundle: None)
    monkeypatch.setattr(demo, "embed_h5ad", lambda *a, **k: {"out": "x", "key": "X_scfm", "n_cells": 1, "dim": 2})
    summary = tmp_path / "summary.json"
    demo.main(["--out", str(out), "--steps", "5", "--summary", str(summary)])
    err = capsys.readouterr().err
    assert "pretraining reused" in err and "previous invocation" in err
    record = json.loads(summary.read_text())
    assert record["reused"] == ["synthetic cells", "convert", "pretrain"]
    assert record["threads"]["torch"] == 1 and "wall_s" in record

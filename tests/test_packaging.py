"""The project installs and runs like a package: pyproject's dependencies are requirements.txt's,
`pip install .` into a fresh venv leaves the checkout clean, and the installed commands run every
job from any folder (the demo end to end)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from launch.scfm import COMMANDS

tomllib = pytest.importorskip("tomllib")  # python >= 3.11
ROOT = Path(__file__).resolve().parents[1]


def _requirements(lines) -> dict[str, str]:
    """name -> version range of requirement lines (comments and blank lines skipped)."""
    reqs = {}
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if text:
            req = Requirement(text)
            assert canonicalize_name(req.name) not in reqs, f"{req.name} listed twice"
            reqs[canonicalize_name(req.name)] = str(req.specifier)
    return reqs


def test_pyproject_dependencies_are_the_requirements_txt_ranges():
    """requirements.txt (what CI and `pip install -r` use) = pyproject's dependencies + its test extra,
    name by name and range by range, so the two cannot drift apart."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirements(project["dependencies"])
    test_extra = _requirements(project["optional-dependencies"]["test"])
    listed = _requirements((ROOT / "requirements.txt").read_text().splitlines())
    assert not set(declared) & set(test_extra), "a package is both a dependency and in the test extra"
    assert {**declared, **test_extra} == listed, (
        "pyproject.toml's [project] dependencies (+ the test extra) differ from requirements.txt: change both")
    assert declared["torch"].startswith("==")  # pinned: the CPU and CUDA wheels of one release
    assert set(project["scripts"]) == {"scfm", "scfm-data"}


def _litter() -> set[str]:
    return {p.name for p in ROOT.iterdir() if p.name == "build" or p.name.endswith(".egg-info")}


@pytest.fixture(scope="module")
def installed():
    """A fresh venv (nothing of this environment's packages) with the checkout installed the way the
    README says: `PIP_CONSTRAINT=constraints.txt pip install .`. About a minute on the busy 2-core dev
    machine (pip's cache spares the downloads); the whole module took 5 minutes there, the demo 2 of
    them. Removed afterwards (~3 GB)."""
    folder = Path(tempfile.mkdtemp(prefix="scfm-venv-"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        before, started = _litter(), time.perf_counter()
        env = {**os.environ, "PIP_CONSTRAINT": str(ROOT / "constraints.txt")}
        env.pop("PYTHONPATH", None)
        # --no-compile: no .pyc for all of torch up front (imports compile what they use)
        install = subprocess.run([str(folder / "bin" / "pip"), "install", "--quiet", "--no-compile", "."],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
        assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
        print(f"pip install . into a fresh venv: {time.perf_counter() - started:.0f} s")
        assert _litter() == before, f"`pip install .` left {sorted(_litter() - before)} in the checkout"
        yield folder / "bin"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def run_outside(installed, tmp_path_factory):
    """Runs a command in a folder outside the checkout: every import must come from the install."""
    work = tmp_path_factory.mktemp("outside")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # DeepSpeed's CPU op, built once for the checkout's runs (installed, it would go to the home folder)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

    def run(*args: str, timeout: float = 300) -> str:
        proc = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    run.work = work
    return run


@pytest.mark.slow
def test_installed_commands_answer_help_outside_the_checkout(installed, run_outside):
    python, scfm = str(installed / "python"), str(installed / "scfm")
    where = run_outside(python, "-c", "import data_pipeline, kernels, launch, pretrain; "
                        "print(data_pipeline.__file__, kernels.__file__, launch.__file__, pretrain.__file__)")
    assert all(path.startswith(str(installed.parent)) for path in where.split()), where
    calls = {command: (scfm, command, "--help") for command in COMMANDS}
    calls.update({"(listing)": (scfm, "--help"), "(scfm-data)": (str(installed / "scfm-data"), "--help"),
                  "(data_pipeline)": (python, "-m", "data_pipeline", "--help"),
                  "(launch.pretrain)": (python, "-m", "launch.pretrain", "--help")})  # `deepspeed --module`'s form
    with ThreadPoolExecutor(4) as pool:  # each one mostly imports torch: side by side, not one after another
        out = dict(zip(calls, pool.map(lambda args: run_outside(*args), calls.values())))
    for command in COMMANDS:
        assert f"  {command} " in out["(listing)"]
        assert f"usage: scfm {command}" in out[command]
    assert "usage: scfm-data" in out["(scfm-data)"]
    assert "usage: python -m data_pipeline" in out["(data_pipeline)"]
    assert "tiny" in out["(launch.pretrain)"]  # the shipped configs, found as package data


@pytest.mark.slow
def test_installed_demo_writes_its_bundle(installed, run_outside):
    """`scfm demo` end to end (a few hundred cells, two steps): the configs travel as package data."""
    out, summary = run_outside.work / "demo", run_outside.work / "demo.json"
    run_outside(str(installed / "scfm"), "demo", "--out", str(out), "--cells", "400", "--steps", "2",
                "--held-out-cells", "200", "--summary", str(summary), timeout=900)
    assert {"model.safetensors", "config.json", "vocab.tsv", "README.md"} <= {p.name for p in (out / "bundle").iterdir()}
    assert "scfm embed THIS_FOLDER" in (out / "bundle" / "README.md").read_text()
    assert (out / "held_out_embedded.h5ad").is_file()
    assert '"steps": 2' in summary.read_text()


def test_pretrain_config_is_a_file_or_a_shipped_config_by_name(tmp_path, monkeypatch):
    """Installed, `launch/configs/tiny.yaml` is no path in the user's folder: `--config tiny` finds the
    package's copy; a file the user names wins; anything else is an error listing the shipped names."""
    from launch.pretrain import CONFIGS, config_path

    monkeypatch.chdir(tmp_path)
    assert config_path("tiny") == config_path("tiny.yaml") == str(CONFIGS / "tiny.yaml")
    (tmp_path / "tiny.yaml").write_text("run: {threads: 1}\n")
    assert config_path("tiny.yaml") == "tiny.yaml" and config_path(None) is None
    with pytest.raises(FileNotFoundError, match=r"--config launch/configs/tiny.yaml: no such file.*celllm.*tiny"):
        config_path("launch/configs/tiny.yaml")

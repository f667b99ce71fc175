"""The GPU machine has no package index: what its device processes import must be on its image
(``benchmarks/gpu_image_packages.txt``, from KINDS.md) or carried as a wheel (``benchmarks/gpu_wheels.txt``,
the list ``benchmarks/gpu_wheels.sh`` downloads into ``.whl/``), and every carried wheel's requirements
must be met there too.

``test_device_imports_are_on_image_or_carried`` (in tests/test_gpu_suite.py, beside the other test of the
same run) reads a run of ``benchmarks/gpu_suite.py --smoke`` (all its parts, each its own process,
``pytest -m gpu`` on the test files with gpu marks among them; made once by `suite_smoke_under_check`), with a
``sitecustomize.py`` first on PYTHONPATH. In every process (children inherit the environment) it

* refuses, as the image would, a top-level import whose distribution is neither on the image nor
  carried (nor the stdlib, nor this project): ``ModuleNotFoundError``, noted with the importer. An
  optional import (``try: import mlflow``) then takes the same path it takes on the GPU; a required one
  makes the part fail. Exception: a module that a package *of the image* imports (pandas -> pytz) is let
  through and only noted: the image's own packages come with what they need, at the image's versions,
  which may differ from this venv's.
* writes, at exit, the top-level names of ``sys.modules`` with their distributions.

The test fails when a part fails, when a refused import is not in ``TOLERATED_ABSENT`` (an optional
import known to be handled), when a module of a distribution neither there nor carried got loaded
anyway, or when a carried wheel is neither imported nor required by another carried wheel.

Residual risk (paths the CPU smoke does not take; none found to need another wheel, checked by reading
the code, not by running it on the GPU):

* DeepSpeed picks its CUDA accelerator on the GPU (``deepspeed.accelerator.cuda_accelerator``: ``pynvml``
  from the image's nvidia-ml-py, optional) instead of the CPU one; op builders JIT-compile there
  (``torch.utils.cpp_extension``, the image's ninja and setuptools) only if an op is used: the project's
  training uses torch's AdamW, not FusedAdam.
* Triton compiles on the GPU (``triton.backends.nvidia``, part of the image's triton) where the smoke
  runs its interpreter; ``torch.cuda``, ``torch._inductor`` with Triton, CUDA events: all inside torch.
* ``flash_attn`` is imported only if importable (not on the image, not carried); ``bench_favor``'s
  ``varlen`` and bench_train's GPU-only branches import only torch.
* DataLoader workers started by fork end with ``os._exit`` (no atexit dump), and a process killed by a
  signal writes nothing: the check needs one dump per part's command line and fails without it.
* The gpu-marked tests skip here without CUDA (collected and run by the suite): imports inside their
  bodies and fixtures are not seen. Check such a path by hand with ``python tests/test_gpu_wheels.py
  COMMAND ...`` (runs COMMAND under the same check). Found so (2026-12-04), and fixed:
  tests/test_gpu_training.py's corpus fixture needed anndata and zarr (the synthetic writer, the
  statistics), which the image lacks: ``benchmarks/gpu_prepare.sh`` writes that corpus here and it
  travels in ``benchmarks/data``; tests.train_helpers.job_env replaced PYTHONPATH (losing the carried
  wheels' folder) and now extends it. ``pytest -q tests/test_gpu_training.py -k cpu_fp32`` passes under
  the check with the prepared corpus.
* Installed distributions are filtered to the image's and the carried ones (``importlib.metadata``), so
  entry points (pytest plugins) of others vanish as they would there; the image's own plugins
  (pytest-cov, -xdist, -timeout, hypothesis, ...) are not installed here and not traced.
* Versions: carried wheels are the versions of this venv (the manifest says which); image packages whose
  version KINDS.md does not give (typing-extensions, einops, ...) are checked by name only, so a carried
  wheel's lower bound on one of them (pydantic: typing-extensions>=4.16.0) is not proven there.

``test_wheel_folder`` reads the METADATA of the wheels in ``.whl/`` (or ``$GPU_WHEELS_DIR``;
``gpu_wheels.sh`` runs it after building): one wheel per manifest line, at its version, for CPython 3.12
x86-64 Linux, every non-optional Requires-Dist (markers evaluated for Python 3.12 on Linux) met by
another wheel or the image. Without the folder (CI) ``test_manifest_requirements_met`` checks the
same from this venv's metadata of the manifest's distributions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
IMAGE_LIST = REPO / "benchmarks" / "gpu_image_packages.txt"
MANIFEST = REPO / "benchmarks" / "gpu_wheels.txt"
WHEEL_DIR = Path(os.environ.get("GPU_WHEELS_DIR") or REPO / ".whl")

# distribution -> why a refused import of it is fine (it is optional where it is imported)
TOLERATED_ABSENT = {
    "mlflow-skinny": "deepspeed (autotuning, monitor) imports mlflow in try/except ImportError; the GPU suite "
                     "runs with MLflow off",
    "zlib-ng": "data_pipeline.conversion.h5direct: an optional speed-up, zlib otherwise (try/except ImportError)",
    "hdf5plugin": "data_pipeline.conversion.readers.open_h5: HDF5 filter plugins, optional (try/except "
                  "ImportError); only the training benchmark's fallback to ../shared/data opens an .h5ad, where no "
                  "benchmarks/gpu_inputs/lengths.npy is carried (the GPU run carries it)",
}
# the environment the wheels are installed into: the image's python3 (3.12.3) on x86-64 Linux
TARGET_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "os_name": "posix", "extra": ""}


def normalize(name: str) -> str:
    """PEP 503."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str | None]:
    """``name[==version]`` per line ('#' comments and a trailing ``[build]`` / ``[override]`` flag ignored) -> {name: version}."""
    pins = {}
    for line in path.read_text().splitlines():
        spec = line.split("#", 1)[0].split()
        if not spec:
            continue
        name, _, version = spec[0].partition("==")
        pins[normalize(name)] = version or None
    return pins


def flagged(path: Path, flag: str) -> set[str]:
    """The names whose line carries ``flag`` (e.g. ``[override]``: carried although the image has the
    package, at a version the carried wheels need and the image is not known to have)."""
    return {normalize(line.split()[0].partition("==")[0]) for line in path.read_text().splitlines()
            if flag in line.split("#", 1)[0].split()[1:]}


def unmet(requires: list[str], have: dict[str, str | None], unproven: list[str] | None = None) -> list[str]:
    """The non-optional requirements (for the target environment) that ``have`` (name -> version or None
    when unknown) does not meet; a version bound on a package of unknown version counts as met (and is
    appended to ``unproven``)."""
    missing = []
    for text in requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(TARGET_ENV):
            continue
        name = normalize(req.name)
        if name not in have:
            missing.append(f"{text} (neither on the image nor carried)")
        elif have[name] is None:
            if req.specifier and unproven is not None:
                unproven.append(text)
        elif req.specifier and not req.specifier.contains(Version(have[name]), prereleases=True):
            missing.append(f"{text} (there: {have[name]})")
    return missing


# --- the import check ----------------------------------------------------------------------------------

SITECUSTOMIZE = r'''
"""Import check for tests/test_gpu_wheels.py: refuse what the GPU image would lack; dump sys.modules at exit."""
import atexit, importlib.machinery, json, os, re, sys

_DIR = os.environ["GPU_IMPORT_CHECK_DIR"]
with open(os.path.join(_DIR, "config.json")) as _f:
    _C = json.load(_f)
_ALLOWED, _IMAGE, _TOPS = set(_C["allowed"]), set(_C["image"]), _C["tops"]
_SITE = tuple(p.rstrip(os.sep) + os.sep for p in _C["site"])
_STDLIB = tuple(p.rstrip(os.sep) + os.sep for p in _C["stdlib"])
_PROJECT = _C["project"].rstrip(os.sep) + os.sep
_cache, _refused, _via_image = {}, [], []


def _classify(top, origin):
    """(kind, dists): kind in stdlib, project, dist, generated, unknown."""
    if top in sys.builtin_module_names:
        return "stdlib", []
    # by name only where no install folder holds it: distutils is the stdlib's up to Python 3.11 and
    # setuptools' (its _distutils, through its import hook) on the GPU image's 3.12
    if top in sys.stdlib_module_names and not (origin and origin.startswith(_SITE)):
        return "stdlib", []
    if origin and not origin.startswith(_SITE) and (origin.startswith(_PROJECT) or origin.startswith(_DIR)):
        return "project", []  # (the venv may lie inside the project: site-packages first)
    if top in _TOPS:
        return "dist", _TOPS[top]
    if origin:
        for site in _SITE:
            if origin.startswith(site):  # e.g. setuptools/_vendor/jaraco: the distribution of setuptools
                first = origin[len(site):].split(os.sep, 1)[0].split(".", 1)[0]
                return ("dist", _TOPS[first]) if first in _TOPS else ("unknown", [])
        if origin.startswith(_STDLIB):
            return "stdlib", []
        return "generated", []  # a file outside every install folder (e.g. torch's templated modules)
    return "unknown", []


def _importer():
    """The module whose code asked for the import: the first frame outside the import machinery
    (importlib and whatever finder hooks run inside it, e.g. pytest's assertion rewriter)."""
    f, inside = sys._getframe(2), False
    while f is not None:
        name = f.f_globals.get("__name__") or ""
        machinery = name == "importlib" or name.startswith(("importlib.", "_frozen_importlib"))
        if machinery:
            inside = True
        elif inside:
            return name
        f = f.f_back
    return "?"


def _allowed(kind, dists):
    return kind in ("stdlib", "project", "generated") or any(d in _ALLOWED for d in dists)


_LET = set()  # distributions let through because a package of the image (or one let through) imported them


def _check(name, spec):
    if name not in _cache:
        origin = spec.origin if spec.origin not in (None, "namespace") else \
            next(iter(spec.submodule_search_locations or []), None)
        _cache[name] = _classify(name, origin)
    kind, dists = _cache[name]
    if _allowed(kind, dists):
        return
    importer = _importer()
    itop = importer.partition(".")[0]
    ifile = getattr(sys.modules.get(itop), "__file__", None)  # where the importer really lives
    ikind, idists = _classify(itop, ifile) if ifile else (_cache.get(itop) or _classify(itop, None))
    entry = {"module": name, "dists": dists, "kind": kind, "importer": importer}
    if ikind == "dist" and any(d in _IMAGE or d in _LET for d in idists):
        _via_image.append(entry)  # the image's package brings its own dependencies there
        _LET.update(dists)
        return
    _refused.append(entry)
    raise ModuleNotFoundError(f"No module named {name!r} (gpu import check: not on the GPU image, not "
                              f"carried; imported by {importer})", name=name)


# Every path-based import of a top-level module passes PathFinder.find_spec (also through finders
# put before any of ours, like pytest's assertion rewriter): check there.
_find_spec = importlib.machinery.PathFinder.find_spec


def _checked_find_spec(cls, name, path=None, target=None):
    spec = _find_spec(name, path, target)
    if spec is not None and "." not in name and name not in sys.stdlib_module_names:
        _check(name, spec)
    return spec


importlib.machinery.PathFinder.find_spec = classmethod(_checked_find_spec)

# Installed distributions as the GPU machine has them (entry points: pytest plugins, ...).
import importlib.metadata as _md  # noqa: E402

_distributions = _md.distributions


def _present(**kwargs):
    for dist in _distributions(**kwargs):
        name = (dist.metadata["Name"] or "").lower()
        if name and re.sub(r"[-_.]+", "-", name) in _ALLOWED:
            yield dist


_md.distributions = _present


def _dump():
    modules = {}
    for full, mod in list(sys.modules.items()):
        top = full.partition(".")[0]
        if top in modules or mod is None:
            continue
        spec = getattr(mod, "__spec__", None)
        origin = getattr(spec, "origin", None) or getattr(mod, "__file__", None)
        kind, dists = _classify(top, origin if origin not in ("built-in", "frozen", "namespace") else None)
        if kind == "unknown" and not origin:
            kind = "synthetic"  # made at run time by an extension or a package (no file)
        modules[top] = [kind, dists]
    with open(os.path.join(_DIR, f"imports-{os.getpid()}.json"), "w") as f:
        json.dump({"argv": sys.argv, "modules": modules, "refused": _refused, "via_image": _via_image}, f)


atexit.register(_dump)
'''


def gpu_marked_test_files() -> list[Path]:
    """Test files that carry a gpu mark (found by text, as gpu_suite.py finds them; this file names none)."""
    return sorted(p for p in (REPO / "tests").glob("test_*.py") if re.search("mark" + r"\.gpu\b", p.read_text()))


def site_dirs() -> list[str]:
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return [str(Path(d).resolve()) for d in dirs] + dirs


def stdlib_dirs() -> list[str]:
    import sysconfig

    paths = sysconfig.get_paths()
    return sorted({str(Path(paths[k]).resolve()) for k in ("stdlib", "platstdlib")} |
                  {paths["stdlib"], paths["platstdlib"]})


def check_env(folder: Path, carried: set[str], image: set[str]) -> dict:
    """Write the import check (sitecustomize.py and its config) into ``folder``; -> the environment
    that puts it first on PYTHONPATH (dumps land in ``folder`` as imports-<pid>.json)."""
    tops = {top: sorted({normalize(d) for d in dists}) for top, dists in metadata.packages_distributions().items()}
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (folder / "config.json").write_text(json.dumps({
        "allowed": sorted(image | carried), "image": sorted(image - carried), "tops": tops,
        "site": [*site_dirs(), str(folder / "out" / "site")], "stdlib": stdlib_dirs(), "project": str(REPO)}))
    return {**os.environ, "GPU_IMPORT_CHECK_DIR": str(folder), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, so the suite's wheels part installs something without an index."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "suite_probe-0.1-py3-none-any.whl"
    info = "suite_probe-0.1.dist-info"
    files = {"suite_probe/__init__.py": "VERSION = '0.1'\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: suite-probe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in {**files, f"{info}/RECORD": record}.items():
            z.writestr(name, text)
    return path


def suite_smoke_under_check(folder: Path) -> dict:
    """Run ``gpu_suite.py --smoke`` (every part, each its own process; `pytest -m gpu` on the test files
    with gpu marks among them) under the import check, installing a probe wheel and bundling as the
    device tool's $OUT would. The one run both tests of tests/test_gpu_suite.py read (the suite works; it
    imports only what the GPU has), through its module fixture ``gpu_suite_smoke``: about 60 s here, once.
    -> {"done": CompletedProcess, "seconds", "out", "back", "wheel", "dumps", "folder", "carried", "image"}"""
    image, carried = read_pins(IMAGE_LIST), read_pins(MANIFEST)
    env = check_env(folder, set(carried), set(image))
    for name in ("MLFLOW_TRACKING_URI", "OUT"):
        env.pop(name, None)
    # a pure-Python probe rather than .whl/: the carried wheels are for CPython 3.12 (pydantic-core is
    # compiled), this venv may be another Python; it holds the manifest's versions
    # (test_manifest_pins_and_image_list)
    wheel = probe_wheel(folder / "wheels")
    out, back = folder / "out", folder / "back"  # back: as the device tool's $OUT (at most 8 files return)
    command = [sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--out", str(out), "--wheels", str(wheel.parent),
               "--bundle", str(back)]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return {"done": done, "seconds": time.monotonic() - started, "out": out, "back": back, "wheel": wheel,
            "dumps": [json.loads(p.read_text()) for p in sorted(folder.glob("imports-*.json"))],
            "folder": folder, "carried": carried, "image": image}


def test_import_check_refuses_what_the_image_lacks(tmp_path):
    """The check itself: with hyper-connections taken off the carried list, importing performer_pytorch
    fails (local_attention needs it) and names the importer; pandas (on the image) still imports even
    if this venv's pandas needs a module the image list lacks; entry points of absent distributions vanish."""
    image, carried = set(read_pins(IMAGE_LIST)), set(read_pins(MANIFEST)) - {"hyper-connections"}
    env = check_env(tmp_path, carried, image)
    code = ("import importlib.metadata as md, sys\n"
            "assert 'mlflow-skinny' not in {d.metadata['Name'] for d in md.distributions()}\n"
            "import pandas\n"
            "try:\n    import performer_pytorch\nexcept ModuleNotFoundError as e:\n    print('REFUSED', e)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "REFUSED No module named 'hyper_connections'" in done.stdout, done.stdout + done.stderr
    (dump,) = [json.loads(p.read_text()) for p in tmp_path.glob("imports-*.json")]
    assert [(e["module"], e["dists"]) for e in dump["refused"]] == [("hyper_connections", ["hyper-connections"])]
    assert dump["refused"][0]["importer"].startswith("local_attention"), dump["refused"]
    assert "hyper_connections" not in dump["modules"] and dump["modules"]["pandas"][0] == "dist"
    if "pytz" in dump["modules"]:  # pandas 2 here imports pytz, which the image (pandas 3?) does not list
        assert any(e["module"] == "pytz" and e["importer"].startswith("pandas") for e in dump["via_image"]), dump


@pytest.mark.slow
def test_manifest_pins_and_image_list():
    carried, image = read_pins(MANIFEST), read_pins(IMAGE_LIST)
    assert all(carried.values()), f"every carried wheel needs name==version: {carried}"
    assert {"torch", "triton", "numpy"} <= set(image) and image["torch"] and image["numpy"], image
    twice = sorted(n for n in carried if n in image and n not in flagged(MANIFEST, "[override]"))
    assert not twice, f"carried although on the image (carry one only for another version, and say why): {twice}"
    drift = {n: (v, metadata.version(n)) for n, v in carried.items()
             if _installed(n) and Version(metadata.version(n)) != Version(v)}
    if drift:  # a warning: a new release in this venv should not fail CI by itself
        warnings.warn(f"benchmarks/gpu_wheels.txt's versions differ from this venv's (the import check traces the "
                      f"venv's; update the manifest and rebuild .whl/): {drift}", stacklevel=2)


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def test_manifest_requirements_met():
    """Without the wheels: the manifest's distributions' Requires-Dist, read from this venv (same versions)."""
    carried, image = read_pins(MANIFEST), read_pins(IMAGE_LIST)
    have = {**image, **carried}
    problems, unchecked = {}, []
    for name, version in carried.items():
        if not _installed(name) or Version(metadata.version(name)) != Version(version):
            unchecked.append(name)
            continue
        missing = unmet(metadata.distribution(name).requires or [], have)
        if missing:
            problems[name] = missing
    assert not problems, f"carried wheels whose requirements the GPU machine would lack: {problems}"
    if unchecked:
        pytest.skip(f"not installed here at the manifest's version, so not checked: {unchecked}")


def _wheel_metadata(path: Path):
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return Parser().parsestr(zf.read(name).decode())


def test_wheel_folder():
    if not WHEEL_DIR.is_dir() or not list(WHEEL_DIR.glob("*.whl")):
        pytest.skip(f"no wheels in {WHEEL_DIR} (bash benchmarks/gpu_wheels.sh builds them)")
    carried, image = read_pins(MANIFEST), read_pins(IMAGE_LIST)
    wheels = {}
    for path in sorted(WHEEL_DIR.glob("*.whl")):
        meta = _wheel_metadata(path)
        name = normalize(meta["Name"])
        assert name not in wheels, f"two wheels of {name}: {wheels[name][0].name}, {path.name}"
        wheels[name] = (path, meta)
        # CPython 3.12 on x86-64 Linux: tags in the file name (name-version[-build]-python-abi-platform.whl)
        python, abi, platform = path.stem.split("-")[-3:]
        assert (any(t in ("py3", "cp312") for t in python.split("."))
                and any(t in ("none", "abi3", "cp312") for t in abi.split("."))
                and all(t == "any" or (t.startswith("manylinux") and t.endswith("x86_64")) for t in platform.split("."))
                ), f"{path.name} does not install on CPython 3.12 x86-64 Linux"
    extra, missing = sorted(set(wheels) - set(carried)), sorted(set(carried) - set(wheels))
    assert not extra and not missing, f"{WHEEL_DIR} != benchmarks/gpu_wheels.txt: extra {extra}, missing {missing}"
    wrong = {n: (m["Version"], carried[n]) for n, (_, m) in wheels.items()
             if Version(m["Version"]) != Version(carried[n])}
    assert not wrong, f"wheel version != manifest version: {wrong}"
    have = {**image, **{n: m["Version"] for n, (_, m) in wheels.items()}}
    unproven: list[str] = []
    problems = {n: miss for n, (_, m) in wheels.items()
                if (miss := unmet(m.get_all("Requires-Dist") or [], have, unproven))}
    assert not problems, f"carried wheels whose requirements the GPU machine would lack: {problems}"
    total = sum(p.stat().st_size for p, _ in wheels.values())
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB; version bounds on image packages of unknown version "
          f"(unproven there): {', '.join(sorted(set(unproven))) or 'none'}")


def main(argv: list[str]) -> int:
    """``python tests/test_gpu_wheels.py COMMAND ...``: run COMMAND under the import check (image list +
    carried manifest) and print what it refused and what it let through; COMMAND's exit code."""
    import tempfile

    if not argv:
        print(main.__doc__)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        env = check_env(Path(tmp), set(read_pins(MANIFEST)), set(read_pins(IMAGE_LIST)))
        env["PYTHONPATH"] += os.pathsep + str(REPO)
        code = subprocess.run(argv, env=env).returncode
        for path in sorted(Path(tmp).glob("imports-*.json")):
            dump = json.loads(path.read_text())
            print(" ".join(dump["argv"])[:120], file=sys.stderr)
            for key in ("refused", "via_image"):
                for e in dump[key]:
                    print(f"  {key}: {e['module']} ({', '.join(e['dists'])}) <- {e['importer']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main(sys.argv[1:]))

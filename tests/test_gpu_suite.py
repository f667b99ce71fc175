"""The GPU suite's one command stays runnable end to end: ``gpu_suite.py --smoke`` runs every part
(wheels, setup with the ceilings, pytest on the GPU-marked files, FAVOR+ bf16 and fp32, training,
contrastive) as its own process on CPU at tiny sizes, each writing its JSON, within about 90 s here
under the GPU image's import check (tests/test_gpu_wheels.py describes it), and imports only what that
image has or the carried wheels add (`test_device_imports_are_on_image_or_carried`, on the same run);
and the pieces the parts share (atomic incremental result files, the FLOP / byte counts, the
pytest counts read back from a log) do what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.test_gpu_wheels import (
    TARGET_ENV,
    TOLERATED_ABSENT,
    gpu_marked_test_files,
    normalize,
    suite_smoke_under_check,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

PARTS = ("wheels", "setup", "pytest_gpu", "favor", "train", "contrastive", "embed", "train_loop", "favor_fp32")


@pytest.fixture(scope="module")
def gpu_suite_smoke(tmp_path_factory) -> dict:
    """``gpu_suite.py --smoke`` run once under the GPU image's import check, for the suite's test and the
    import check's (`tests.test_gpu_wheels.suite_smoke_under_check`). Both tests live in this file so that
    a run split over processes by file (the README's ``pytest -n ... --dist loadfile``) still runs it once."""
    return suite_smoke_under_check(tmp_path_factory.mktemp("gpu_suite_smoke"))


def test_gpu_suite_smoke_runs_every_part(gpu_suite_smoke):
    """The run is the import check's (tests/test_gpu_wheels.py): one smoke run serves both tests."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("--smoke is the CPU check; on a GPU run the suite itself")
    r, out, back, wheel = (gpu_suite_smoke[k] for k in ("done", "out", "back", "wheel"))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    print(f"gpu_suite --smoke: {gpu_suite_smoke['seconds']:.0f} s")

    suite = json.loads((out / "gpu_suite_cpu.json").read_text())
    assert suite["status"] == "ok" and suite["smoke"] is True
    assert sorted(p.name for p in back.iterdir()) == ["gpu_suite_cpu.json", "gpu_suite_results_cpu.tar.gz"]
    assert json.loads((back / "gpu_suite_cpu.json").read_text()) == suite
    with tarfile.open(back / "gpu_suite_results_cpu.tar.gz") as tar:
        packed = set(tar.getnames())
    assert {"gpu_suite_cpu.json", "train_cpu.json", "favor_cpu.json", "train.log"} <= packed
    assert packed == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert list(suite["parts"]) == list(PARTS)
    assert sum(p["budget_s"] for p in suite["plan"]) <= 560  # of the 600 s a part may run; the rest: start-up
    for part, rec in suite["parts"].items():
        assert rec["status"] == "ok" and rec["exit_code"] in (0, None), (part, rec)
        assert {"exit_code", "seconds", "timeout_s"} <= set(rec), part
        assert "output_tail" not in rec
    assert suite["parts"]["wheels"]["wheels"] == [wheel.name]
    results = {name for rec in suite["parts"].values() for name in rec.get("results", [])}
    for name in ("ceilings_cpu.json", "favor_cpu.json", "train_cpu.json", "contrastive_cpu.json",
                 "favor_fp32_cpu.json", "embed_cpu.json"):
        assert name in results and (out / name).exists(), name
    # the loop benchmark trains on the corpus gpu_prepare.sh makes (a clean checkout has none)
    prepared = (REPO / "benchmarks" / "gpu_inputs" / "gpu_test_corpus").is_dir()
    assert ("train_loop_cpu.json" in results) == prepared, suite["parts"]["train_loop"]
    if not prepared:
        assert "gpu_prepare.sh" in suite["parts"]["train_loop"]["note"]

    ceilings = json.loads((out / "ceilings_cpu.json").read_text())
    assert ceilings["partial"] is False
    c = ceilings["ceilings"]
    assert c["gemm_bf16_tflops"] > 0 and c["gemm_tf32_tflops"] > 0 and c["copy_gbps"] > 0
    assert {"python", "torch", "triton", "deepspeed", "cuda", "driver"} <= set(ceilings["versions"])

    # the GPU-marked test files were collected and run: here every test skips (no CUDA)
    tests = suite["parts"]["pytest_gpu"]
    if tests["test_files"]:
        counts = json.loads((out / "gpu_tests_cpu.json").read_text())
        assert counts["failed"] == 0 and counts["errors"] == 0 and counts["passed"] + counts["skipped"] > 0

    favor = json.loads((out / "favor_cpu.json").read_text())
    assert favor["partial"] is False and favor["ceilings"] == c
    measured = [row for row in favor["rows"] if row.get("fwd_ms") is not None]
    assert {row["impl"] for row in measured} >= {"favor_triton", "performer_pytorch", "sdpa"}
    assert all(row["fwd_gap"] > 0 and row["counts"]["fwd_flops"] > 0 for row in measured)
    # the operators' own time beside the timed calls (on a GPU the kernels'), and how many they were
    assert all(0 < row["fwd_kernel_ms"] and row["fwd_launches"] < row["fwd_bwd_launches"] for row in measured)
    fp32 = json.loads((out / "favor_fp32_cpu.json").read_text())
    assert {row["impl"] for row in fp32["rows"]} == {"favor_triton"} and fp32["dtype"] == "fp32"

    train = json.loads((out / "train_cpu.json").read_text())
    assert train["partial"] is False and train["settings"]["measured_gemm_tflops"] == c["gemm_bf16_tflops"]
    ran = [row for row in train["rows"] if not row["skipped"]]
    assert ran and all(row["mfu_measured_gemm"] > 0 for row in ran)
    lengths = train["settings"]["lengths"]
    data = REPO / "benchmarks" / "gpu_inputs"
    shared = REPO.parent / "shared" / "data" / "h5ad"  # bench_train's --data default
    assert lengths == ("real" if (data / "lengths.json").exists() else "file" if (data / "lengths.npy").exists()
                       else "real" if shared.is_dir() else "synthetic")

    embed = json.loads((out / "embed_cpu.json").read_text())
    assert embed["partial"] is False and all(row["cells_per_s"] > 0 for row in embed["rows"])
    assert "padded_to_cap" in {row["mode"] for row in ran}

    contrastive = json.loads((out / "contrastive_cpu.json").read_text())
    assert contrastive["partial"] is False and {row["status"] for row in contrastive["rows"]} == {"ok"}

    assert "=== gpu_suite summary ===" in r.stdout and r.stdout.rstrip().splitlines()[-1].startswith("suite: ok")
    assert len(r.stdout) < 12_000  # the device tool returns the last 12,000 characters


def test_a_record_names_the_code_its_process_started_from(monkeypatch):
    """A benchmark of hours writes its record at the end: ``code`` is the checkout it started from,
    and ``code_at_write`` says where the checkout moved on meanwhile (absent when it did not)."""
    import common

    started = {"commit": "a" * 40, "modified": False}
    monkeypatch.setattr(common, "CODE_AT_START", started)
    monkeypatch.setattr(common, "code_version", lambda: started)
    assert common.result_record("probe")["code"] == started and "code_at_write" not in common.result_record("probe")
    later = {"commit": "b" * 40, "modified": True}
    monkeypatch.setattr(common, "code_version", lambda: later)
    record = common.result_record("probe", x=1)
    assert record["code"] == started and record["code_at_write"] == later
    assert list(record)[:5] == ["benchmark", "date", "code", "code_at_write", "x"]


def test_result_file_is_rewritten_after_every_row(tmp_path):
    from common import ResultFile

    path = tmp_path / "r.json"
    result = ResultFile(path, "probe", settings={"a": 1})
    assert json.loads(path.read_text())["partial"] is True
    result.add({"x": 1})
    first = json.loads(path.read_text())
    assert first["rows"] == [{"x": 1}] and first["partial"] is True and list(first)[-1] == "command"
    result.add({"x": 2})
    result.finish(done=True)
    last = json.loads(path.read_text())
    assert last["rows"] == [{"x": 1}, {"x": 2}] and last["partial"] is False and last["done"] is True
    assert list(last)[-1] == "command"
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    # which code made it: this checkout's commit (None where there is no git checkout, as on the device)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert last["code"]["commit"] == head.stdout.strip() and isinstance(last["code"]["modified"], bool)
    else:
        assert last["code"] is None


def test_attention_cost_counts():
    from bench_favor import attention_cost, counts_table

    t, h, d, m = 4 * 1024, 8, 64, 256
    favor = attention_cost("favor", 1024, 4, h, d, m)
    assert favor["fwd_flops"] == t * h * (8 * m * d + 3 * m)  # features, state, query features, output, normalizer
    assert favor["bwd_flops"] == 2.5 * favor["fwd_flops"]
    assert favor["fwd_bytes"] == 4 * t * h * d * 2  # q, k, v read, out written, bf16
    assert favor["bwd_bytes"] == 7 * t * h * d * 2  # q, k, v, dO read, dq, dk, dv written
    exact = attention_cost("exact", 1024, 4, h, d, m, elem_bytes=4)
    assert exact["fwd_flops"] == 4 * 4 * h * 1024**2 * d and exact["fwd_bytes"] == 4 * t * h * d * 4
    table = counts_table([256, 16906], 65536, h, d, m, 2, {"gemm_bf16_tflops": 800.0, "copy_gbps": 4300.0})
    assert table.count("\n") == 5 and "| favor | 16,906 | 4 |" in table


def test_pytest_counts_from_the_log_when_no_xml(tmp_path):
    from gpu_suite import pytest_counts

    log = tmp_path / "pytest_gpu.log"
    log.write_text("tests/test_a.py::test_one PASSED [ 33%]\ntests/test_a.py::test_two[x] FAILED [ 66%]\n"
                   "tests/test_b.py::test_three SKIPPED (needs CUDA) [100%]\n[gpu_suite: killed after 90 s]\n")
    counts = pytest_counts(tmp_path / "missing.xml", log)
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 1, 0, 1)


def test_a_running_part_is_packed_while_it_runs_and_a_timeout_kills_it(tmp_path):
    """run_command calls ``every`` (the suite's packing) while the part runs, so a suite killed by
    the device tool mid-part keeps that part's rows; at its limit the part's process group dies."""
    from gpu_suite import run_command

    calls = []
    code, seconds = run_command([sys.executable, "-c", "import time; time.sleep(1.5)"], tmp_path / "a.log", 20,
                                dict(os.environ), every=lambda: calls.append(time.monotonic()), interval=0.2)
    assert code == 0 and len(calls) >= 3
    code, seconds = run_command([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "b.log", 1.0,
                                dict(os.environ))
    assert code == "timeout" and seconds < 10 and "killed after 1 s" in (tmp_path / "b.log").read_text()


def test_gpu_commands_parse(tmp_path):
    """The GPU forms of the parts' commands (never run here) are accepted by each script's parser,
    with the values the suite means: a typo in a flag would cost a device call."""
    import bench_contrastive
    import bench_favor
    import bench_train
    import bench_train_loop
    from gpu_suite import PLAN, part_commands

    assert sum(budget for _, budget, _ in PLAN) <= 560
    commands = {part: part_commands(part, tmp_path, "nvidia-h200", smoke=False, timeout=150)[0]
                for part, _, _ in PLAN if part not in ("wheels", "setup", "pytest_gpu")}
    for part, command in commands.items():
        assert "--smoke" not in command and command[1].startswith("benchmarks/"), (part, command)
    ceilings = str(tmp_path / "ceilings_nvidia-h200.json")

    favor = bench_favor.parser().parse_args(commands["favor"][2:])
    assert favor.ceilings == Path(ceilings) and favor.dtype is None and favor.impls is None
    fp32 = bench_favor.parser().parse_args(commands["favor_fp32"][2:])
    assert fp32.dtype == "fp32" and fp32.impls == ["favor_triton"]

    train = bench_train.parse_args(commands["train"][2:])
    assert train.device == "cuda" and train.presets == ["geneformer-10m", "scgpt"]
    assert train.backends == ["sdpa", "varlen", "favor"] and train.modes[0] == "packed"  # never-run backends last
    assert (train.warmup, train.timed, train.budget_s) == (2, 8, 125) and train.ceilings == Path(ceilings)
    from pretrain.config import ATTENTION_BACKENDS

    assert set(train.backends) <= set(ATTENTION_BACKENDS)  # varlen is offered by the trainer

    loop = bench_train_loop.parser().parse_args(commands["train_loop"][2:])
    assert (loop.repeats, loop.steps, loop.overrides) == (1, 150, ["model.attention=sdpa"]) and loop.baseline is None

    from gpu_suite import gpu_test_files

    tests = part_commands("pytest_gpu", tmp_path, "nvidia-h200", smoke=False, timeout=150)[0]
    marks = tests[tests.index("-m", tests.index("pytest")) + 1]
    assert marks == "gpu"  # every dtype: the fp32 kernels compile in about a second each, as the others
    # the kernel file's model-size tests are its first GPU tests: they run before the part's time runs out
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m",
                             marks, "tests/test_favor_kernel.py"], cwd=REPO,
                            capture_output=True, text=True, timeout=120).stdout
    selected = [line.split("::")[1].split("[")[0] for line in listed.splitlines() if "::" in line]
    assert selected[:5] == ["test_compiled_kernels_equal_float64_reference_at_model_size"] * 3 + [
        "test_compiled_kernels_are_deterministic"] * 2, listed
    assert "test_forward_equals_reference" in selected and "test_empty_sequences_are_allowed" in selected
    files = gpu_test_files()  # the never-run kernels first, then what proves training
    assert files[:2] == ["tests/test_favor_kernel.py", "tests/test_gpu_training.py"]
    assert tests[-len(files):] == files

    contrastive = bench_contrastive.parser().parse_args(commands["contrastive"][2:])
    assert contrastive.device == "cuda" and contrastive.budget_s == 140 and contrastive.in_process is None

    setup = part_commands("setup", tmp_path, "nvidia-h200", smoke=False, timeout=45)[0]
    assert setup[2:] == ["--setup-only", ceilings]


def test_device_imports_are_on_image_or_carried(gpu_suite_smoke):
    run = gpu_suite_smoke
    dumps, folder, carried, image = run["dumps"], run["folder"], run["carried"], run["image"]
    runs = {" ".join(run["done"].args[1:]): (run["done"].returncode, run["done"].stdout + run["done"].stderr)}
    refused = {}
    for dump in dumps:
        for entry in dump["refused"]:
            refused.setdefault(entry["module"], (entry["dists"], set()))[1].add(entry["importer"])
    report = "; ".join(f"{m} ({', '.join(d) or 'no distribution'}) imported by {', '.join(sorted(i))}"
                       for m, (d, i) in sorted(refused.items()))
    print("refused as on the GPU image:", report or "nothing")
    via = sorted({f"{e['module']} <- {e['importer']}" for dump in dumps for e in dump["via_image"]})
    print("let through for the image's own packages (their dependencies there):", ", ".join(via) or "nothing")

    suite_file = folder / "out" / "gpu_suite_cpu.json"
    assert suite_file.exists(), f"the suite wrote no {suite_file.name}: {next(iter(runs.values()))[1][-4000:]}"
    parts = json.loads(suite_file.read_text())["parts"]
    for command, (code, output) in runs.items():
        detail = "\n".join(f"--- {p}: {r['status']}\n{r.get('output_tail', '')[-2500:]}"
                           for p, r in parts.items() if r["status"] not in ("ok", "skipped")) or output[-4000:]
        assert code == 0, (f"{command} failed under the import check (refused: {report or 'nothing'}); a part "
                           f"that needs a refused module needs its wheel in benchmarks/gpu_wheels.txt:\n{detail}")

    # every process of a part wrote its dump (one that did not, e.g. killed, would go unchecked)
    argvs = [" ".join(d["argv"]) for d in dumps]
    for part, record in parts.items():
        if record.get("command"):
            marker = {"setup": "--setup-only", "pytest_gpu": "--junitxml=", "wheels": None}.get(
                part, f"{part}_cpu.json")
            assert marker is None or any(marker in a for a in argvs), f"no import dump from the {part} part: {argvs}"
    assert parts.get("pytest_gpu", {}).get("command") or not gpu_marked_test_files(), parts.get("pytest_gpu")

    unexpected = {m: v for m, v in refused.items() if not set(v[0]) & set(TOLERATED_ABSENT)}
    assert not unexpected, (
        "device processes import modules that are neither on the GPU image nor carried; the runs passed "
        "without them (optional imports), so either carry them (benchmarks/gpu_wheels.txt) or add their "
        f"distribution to TOLERATED_ABSENT with the reason: {unexpected}")

    allowed = set(image) | set(carried)
    via_tops = {e["module"] for d in dumps for e in d["via_image"]}
    loaded, stray = {}, {}
    for dump in dumps:
        for top, (kind, dists) in dump["modules"].items():
            for dist in dists:
                loaded.setdefault(dist, set()).add(top)
            if top not in via_tops and (kind == "unknown" or (kind == "dist" and not set(dists) & allowed)):
                stray.setdefault(top, (kind, dists, dump["argv"][:2]))
    assert not stray, f"loaded, but neither stdlib, project, on the image nor carried: {stray}"

    # exactly what is needed: each carried wheel imported, or required by another carried wheel
    required = set()
    for name in carried:
        try:
            required |= {normalize(Requirement(r).name) for r in metadata.distribution(name).requires or []
                         if Requirement(r).marker is None or Requirement(r).marker.evaluate(TARGET_ENV)}
        except metadata.PackageNotFoundError:
            pass
    unused = sorted(set(carried) - set(loaded) - required)
    assert not unused, f"carried but neither imported by a device process nor required by a carried wheel: {unused}"
    print("carried and imported:", ", ".join(sorted(set(carried) & set(loaded))))

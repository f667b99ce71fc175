"""Two optimizer steps of the real trainer (launch/pretrain.py: loader, model, gradient-cached
objectives, DeepSpeed ZeRO-2) on one GPU in bf16, for each attention backend that runs there
(favor: the Triton kernel; varlen: torch's FlashAttention varlen kernel; sdpa), against the same two
steps in fp32 on the CPU (sdpa for the exact backends, favor's batched PyTorch path for favor): same
corpus, seed and batches, dropout off, MLflow off (the GPU machine has no mlflow).

Tolerances, from the same comparison made on the CPU (DeepSpeed's bf16 mode against fp32, this model,
these batches): the losses differ by ~2e-5 relative, the gradient norm by ~2e-3, the loss change of
the second step by ~0.2 %. The bounds below (loss 5e-3, gradient norm 5e-2, loss change 10 %) leave
a wide margin for the GPU's other summation orders and kernels, yet a skipped or wrong update, other
batches or a non-finite step fail them. At this initialization the loss barely depends on attention
(favor and sdpa agree to 1e-5), so the attention kernels themselves are checked against float64 in
tests/test_attention_backends.py; this test checks that each backend trains under DeepSpeed bf16.

The CPU half (the fp32 reference run) is exercised in CI: it runs twice and must repeat exactly;
where `benchmarks/gpu_prepare.sh` made the carried reference, the first of the two is that file.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train_helpers import (
    LOSS_KEYS,
    PREPARED_CORPUS,
    ROOT,
    job_env,
    make_corpus,
    prepared_reference,
    summary,
    two_step_run,
)

LOSS_RTOL, GRAD_NORM_RTOL, LOSS_CHANGE_RTOL = 5e-3, 5e-2, 0.1
REFERENCE_OF = {"favor": "favor", "varlen": "sdpa", "sdpa": "sdpa"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The synthetic corpus: the one `gpu_prepare.sh` carried to the GPU machine (whose image has
    no anndata or zarr to write one), else a fresh one of the same shape."""
    if PREPARED_CORPUS.is_dir():
        return PREPARED_CORPUS
    try:
        return make_corpus(tmp_path_factory.mktemp("corpus"), n_cells=200, n_genes=300)
    except ImportError as err:
        pytest.fail(f"cannot write the test corpus here ({err}): run `bash benchmarks/gpu_prepare.sh` on a machine "
                    f"with the project's requirements and carry benchmarks/gpu_inputs along")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """``reference(backend)``: the metrics of the fp32 CPU run with that backend (each run once): the
    one `gpu_prepare.sh` made and carried when it was made by this code on this corpus, else run here."""
    runs: dict[str, list[dict]] = {}

    def get(backend: str) -> list[dict]:
        if backend not in runs:
            runs[backend] = prepared_reference(corpus, backend) or two_step_run(
                corpus, tmp_path_factory.mktemp(f"cpu-{backend}") / "run", backend, cpu=True)
        return runs[backend]

    return get


def check_run(history: list[dict]) -> None:
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert all(math.isfinite(h[k]) for k in LOSS_KEYS) and h["skipped_steps"] == 0, h


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --- CPU (CI): the reference half ---------------------------------------------------------------

@pytest.mark.slow
def test_cpu_fp32_reference_run_repeats_exactly(corpus, reference, tmp_path):
    first = reference("sdpa")
    check_run(first)
    again = two_step_run(corpus, tmp_path / "run", "sdpa", cpu=True)
    check_run(again)
    for a, b in zip(first, again):
        for key in (*LOSS_KEYS, "grad_norm", "lr"):
            assert a[key] == b[key], (key, a, b)
    done = summary(tmp_path / "run")
    assert done["device"] == "cpu" and done["bf16"] is False and done["mlflow_tracking_uri"] is None
    assert first[1]["loss"] != first[0]["loss"]  # the first step's update changed the model


def test_the_entry_point_does_not_import_mlflow():
    """What a run with run.mlflow=false imports (launch/pretrain.py and the trainer) leaves mlflow out."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('entry', {str(ROOT / 'launch' / 'pretrain.py')!r})\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "import pretrain.train, pretrain.metrics, pretrain.checkpoint, tests.train_helpers\n"
            "assert 'mlflow' not in sys.modules, 'mlflow imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], env=job_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- GPU: bf16 under ZeRO-2, against the fp32 CPU reference ------------------------------------------

@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa", "varlen", "favor"])  # favor last: its kernels compile first
def test_bf16_zero2_gpu_steps_equal_fp32_cpu_reference(backend, corpus, reference, tmp_path):
    expected = reference(REFERENCE_OF[backend])
    got = two_step_run(corpus, tmp_path / "run", backend, cpu=False, bf16=True)
    check_run(got)
    done = summary(tmp_path / "run")
    assert done["device"].startswith("cuda") and done["bf16"] is True, done
    for g, e in zip(got, expected):
        for key in LOSS_KEYS:
            assert relative(g[key], e[key]) <= LOSS_RTOL, (backend, g["step"], key, g[key], e[key])
        assert relative(g["grad_norm"], e["grad_norm"]) <= GRAD_NORM_RTOL, (backend, g, e)
    change, expected_change = got[1]["loss"] - got[0]["loss"], expected[1]["loss"] - expected[0]["loss"]
    assert relative(change, expected_change) <= LOSS_CHANGE_RTOL, (backend, change, expected_change)


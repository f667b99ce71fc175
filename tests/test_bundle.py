"""The export bundle as other tools and users meet it (issue 24, point 2): config.json carries
``model_type`` and the architecture at top level beside the full model config, the safetensors
metadata names the format, `CellModel.from_pretrained` and `pretrain.load_pretrained` load it,
bundles of the format before still load, and the model card says what the model is, what it was
trained on, and embeds with the one command it shows.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_pipeline.conversion.vocab import Vocabulary
from data_pipeline.loading.normalize import Normalization
from pretrain.config import ModelConfig
from pretrain.export import normalization_record, write_bundle
from pretrain.model import CellModel
from tests.train_helpers import TINY, make_corpus, run_pretrain

ROOT = Path(__file__).resolve().parents[1]
GENES = [f"ENSG{100000000 + i:011d}" for i in range(30)]


def _parts(preset_attention: str = "favor"):
    vocab = Vocabulary.from_genes(GENES, [f"GN{chr(65 + i)}" for i in range(len(GENES))])
    config = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=1, n_heads=2, attention=preset_attention,
                         favor_features=16, n_bins=7, dropout=0.0)
    return CellModel.initial(config, seed=0), config, vocab


def _same_weights(a: CellModel, b: CellModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_config_json_has_model_type_and_architecture_at_top_level(tmp_path):
    model, config, vocab = _parts()
    bundle = write_bundle(tmp_path / "b", model.state_dict(), config, vocab.to_tsv(),
                          Normalization(mode="log1p_bins", n_bins=7), "# card\n", preset="celllm")
    meta = json.loads((bundle / "config.json").read_text())
    assert meta["bundle_format"] == 2 and meta["model_type"] == "scfm-performer" and meta["preset"] == "celllm"
    assert (meta["d_model"], meta["n_layers"], meta["n_heads"], meta["vocab_size"]) == (32, 1, 2, len(vocab))
    assert meta["attention"] == "favor" and meta["pooling"] == "cls" and meta["embedding_dim"] == 32
    assert meta["n_genes"] == len(GENES) and meta["model"] == asdict(config)  # the full config kept
    with safe_open(str(bundle / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["bundle_format"] == "2" and f.metadata()["model_type"] == "scfm-performer"


def test_a_bundle_replaces_only_a_bundle_or_an_empty_folder(tmp_path):
    """`--out` naming a run folder or a folder of bundles is refused with nothing deleted; an
    earlier bundle is replaced, an empty folder filled, and no temp is left beside them."""
    model, config, vocab = _parts()
    norm = Normalization(mode="log1p_bins", n_bins=7)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    shelf = tmp_path / "bundles"
    write_bundle(shelf / "first", model.state_dict(), config, vocab.to_tsv(), norm, "# first\n")
    for taken in (run, shelf, run / "config.yaml"):
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        with pytest.raises(FileExistsError, match="neither a bundle nor an empty folder"):
            write_bundle(taken, model.state_dict(), config, vocab.to_tsv(), norm, "# card\n")
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    write_bundle(shelf / "first", model.state_dict(), config, vocab.to_tsv(), norm, "# second\n")
    assert (shelf / "first" / "README.md").read_text() == "# second\n"
    (tmp_path / "empty").mkdir()
    write_bundle(tmp_path / "empty", model.state_dict(), config, vocab.to_tsv(), norm, "# card\n")
    _same_weights(CellModel.from_pretrained(tmp_path / "empty"), model)
    assert sorted(p.name for p in shelf.iterdir()) == ["first"]  # the old bundle and the temp are gone


def test_reading_checks_the_files_agree_and_the_gpu_runs_the_backend(tmp_path, monkeypatch, caplog):
    """A vocabulary of another export is refused; a model key this code does not know is named; a
    FlashAttention backend reads as sdpa on a GPU before Ampere, and stays on one after."""
    from pretrain.model.bundle import read_bundle

    model, config, vocab = _parts("varlen")
    norm = Normalization(mode="log1p_bins", n_bins=7)
    bundle = write_bundle(tmp_path / "b", model.state_dict(), config, vocab.to_tsv(), norm, "# card\n")
    for capability, attention in (((7, 0), "sdpa"), ((9, 0), "varlen")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert read_bundle(bundle, device="cuda")[0].attention == attention
    assert read_bundle(bundle)[0].attention == "sdpa"  # on the CPU
    meta = json.loads((bundle / "config.json").read_text())
    meta["model"]["future_switch"] = True
    (bundle / "config.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="pretrain.model.bundle"):
        read_bundle(bundle)
    assert "model keys this code does not know: future_switch" in caplog.text
    shorter = Vocabulary.from_genes(GENES[:-1], [f"GN{chr(65 + i)}" for i in range(len(GENES) - 1)])
    (bundle / "vocab.tsv").write_bytes(shorter.to_tsv())
    with pytest.raises(ValueError, match="vocab.tsv holds .* tokens, config.json's vocab_size is"):
        read_bundle(bundle)


def test_from_pretrained_and_load_pretrained_load_the_bundle(tmp_path):
    import pretrain

    model, config, vocab = _parts("sdpa")
    bundle = write_bundle(tmp_path / "b", model.state_dict(), config, vocab.to_tsv(),
                          Normalization(mode="log1p_bins", n_bins=7), "# card\n")
    assert json.loads((bundle / "config.json").read_text())["model_type"] == "scfm-transformer"
    for loaded in (CellModel.from_pretrained(bundle), pretrain.load_pretrained(bundle)):
        assert isinstance(loaded, CellModel) and not loaded.training
        _same_weights(loaded, model)
        assert loaded.vocab.n_genes == len(GENES) and loaded.normalization.mode == "log1p_bins"


def test_a_bundle_of_the_format_before_still_loads(tmp_path):
    """Format 1 as `launch/export.py` wrote it until now: config.json = {bundle_format: 1, model: ...},
    safetensors without metadata."""
    model, config, vocab = _parts()
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(old / "model.safetensors"))
    (old / "config.json").write_text(json.dumps({"bundle_format": 1, "model": asdict(config)}))
    (old / "vocab.tsv").write_bytes(vocab.to_tsv())
    (old / "normalization.json").write_text(json.dumps(normalization_record(Normalization(mode="log1p_bins",
                                                                                          n_bins=7))))
    _same_weights(CellModel.from_pretrained(old), model)


def test_unreadable_and_edited_configs_are_refused_naming_the_fix(tmp_path):
    from pretrain import load_pretrained

    model, config, vocab = _parts()
    bundle = write_bundle(tmp_path / "b", model.state_dict(), config, vocab.to_tsv(),
                          Normalization(mode="log1p_bins", n_bins=7), "# card\n")
    meta = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps({**meta, "d_model": 64}))
    with pytest.raises(ValueError, match="top-level d_model differ .* export the run again"):
        load_pretrained(bundle)
    (bundle / "config.json").write_text(json.dumps({**meta, "bundle_format": 9}))
    with pytest.raises(ValueError, match="bundle format 9; this code reads formats 1, 2: update this code"):
        load_pretrained(bundle)


@pytest.mark.slow
def test_exported_bundle_card_describes_the_model_and_its_command_embeds(tmp_path):
    corpus = make_corpus(tmp_path / "data", n_cells=96, n_genes=300)
    run = tmp_path / "run"
    run_pretrain([*TINY, f"data.corpus={corpus}", f"run.out={run}", "schedule.max_steps=1", "run.checkpoint_every=1"])
    bundle = tmp_path / "bundle"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), str(run), "--out", str(bundle)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((bundle / "config.json").read_text())
    assert meta["model_type"] == "scfm-performer" and meta["d_model"] == 32 and meta["n_layers"] == 1
    card = (bundle / "README.md").read_text()
    assert "scfm-performer" in card and "96 cells" in card and "cells.h5ad (96 cells)" in card  # the corpus's source
    assert "trained for 1 optimizer steps" in card and "embedding width 32" in card
    # the card's one command, as a user would paste it (with their file names)
    command = re.search(r"```\n(scfm embed [^\n]+)\n```", card).group(1)
    source, out = corpus.parent / "cells.h5ad", tmp_path / "embedded.h5ad"
    argv = [{"THIS_FOLDER": str(bundle), "cells.h5ad": str(source), "cells_embedded.h5ad": str(out)}.get(a, a)
            for a in shlex.split(command)]
    # `scfm` as installed (tests/test_packaging.py runs the installed script itself): its module, from the checkout
    proc = subprocess.run([sys.executable, "-m", "launch.scfm", *argv[1:], "--threads", "1"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    embedded = ad.read_h5ad(out)
    assert embedded.obsm["X_scfm"].shape == (embedded.n_obs, 32) and np.isfinite(embedded.obsm["X_scfm"]).all()
    # the corpus moved since the run: export names --corpus, which takes it where it is now, and refuses
    # a corpus of another vocabulary
    moved = tmp_path / "moved"
    corpus.rename(moved)

    def export(*more):
        return subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), str(run), "--out",
                               str(tmp_path / "again"), *more], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)

    proc = export()
    assert proc.returncode == 2 and "Pass --corpus PATH" in proc.stderr and str(corpus) in proc.stderr, proc.stderr
    proc = export("--corpus", str(moved))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "again" / "vocab.tsv").read_bytes() == (bundle / "vocab.tsv").read_bytes()
    other = make_corpus(tmp_path / "other", n_cells=40, n_genes=120)
    proc = export("--corpus", str(other))
    assert proc.returncode == 2 and "not the one the checkpoint was trained with" in proc.stderr, proc.stderr

"""Library code reports through `logging` and prints nothing, so a program embedding it decides what
is shown; the CLIs set logging up once (`data_pipeline/log_setup.py`): INFO as before by default,
`-q` warnings and errors only, `-v` debug messages too."""

from __future__ import annotations

import importlib.util
import logging

import pytest

from data_pipeline.cli import main
from data_pipeline.log_setup import setup_logging
from data_pipeline.synthetic import write_synthetic_h5ad
from tests.corpus_helpers import random_counts, write_h5ad
from tests.train_helpers import ROOT


def test_a_library_call_logs_and_prints_nothing(tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="data_pipeline"):
        write_synthetic_h5ad(tmp_path / "cells.h5ad", 300, n_genes=200, progress=True)
    said = [(r.name, r.levelname, r.getMessage().split(",")[0]) for r in caplog.records]
    assert said == [("data_pipeline.synthetic", "INFO", "synthetic: 300/300 cells")]
    assert capsys.readouterr() == ("", "")


def _convert_cli(tmp_path, capsys, name: str, *flags: str, mixed: bool = False) -> str:
    """``python -m data_pipeline convert`` in-process; -> what it wrote to stderr (stdout stays empty)."""
    (tmp_path / name).mkdir()
    inputs = [write_h5ad(tmp_path / name / "human.h5ad", random_counts(40, 12, seed=1, density=0.9))]
    if mixed:
        inputs.append(write_h5ad(tmp_path / name / "mouse.h5ad", random_counts(20, 8, seed=2, density=0.9),
                                 gene_ids=[f"ENSMUSG{i:011d}" for i in range(8)]))
    assert main(["convert", *map(str, inputs), "--out", str(tmp_path / name / "corpus"), "--workers", "1", "--no-progress",
                 *flags]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    return err


def test_the_cli_shows_info_by_default_and_quiet_only_warnings(tmp_path, capsys):
    err = _convert_cli(tmp_path, capsys, "default")
    assert "cells read 40 = written 40" in err and "done in " in err  # what the CLI printed before
    assert "debug:" not in err
    assert _convert_cli(tmp_path, capsys, "quiet", "-q") == ""
    err = _convert_cli(tmp_path, capsys, "quiet_mixed", "--quiet", mixed=True)
    assert err.startswith("warning: the vocabulary mixes genes of 2 species") and "cells read" not in err


def test_verbose_shows_debug_messages(tmp_path, capsys):
    err = _convert_cli(tmp_path, capsys, "verbose", "-v")
    assert "debug: convert: 1 of this node's 1 work units left to do" in err and "debug: convert: plan took" in err
    assert "cells read 40 = written 40" in err


def test_ranks_other_than_0_show_warnings_only_unless_verbose(capsys):
    """A distributed job says each thing once (rank 0); -v shows every rank's messages."""
    for rank, verbose, shown in ((0, False, ["hello", "warning: careful"]), (1, False, ["warning: careful"]),
                                 (1, True, ["debug: detail", "hello", "warning: careful"])):
        setup_logging(verbose=verbose, rank=rank)
        logger = logging.getLogger("pretrain.somewhere")
        logger.debug("detail")
        logger.info("hello")
        logger.warning("careful")
        assert capsys.readouterr().err.splitlines() == shown, (rank, verbose)


@pytest.mark.parametrize("script", ["cluster_cells.py", "demo.py", "embed.py", "export.py", "finetune.py",
                                    "predict.py", "pretrain.py"])
def test_every_launch_command_takes_verbose_and_quiet(script, capsys):
    spec = importlib.util.spec_from_file_location(f"launch_{script[:-3]}", ROOT / "launch" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "-v, --verbose" in text and "-q, --quiet" in text

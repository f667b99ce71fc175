"""Pretrain a single-cell foundation model.

    deepspeed launch/pretrain.py --config launch/configs/tiny.yaml [key.sub=value ...]
    torchrun --nproc_per_node 8 launch/pretrain.py --config ... ;  python launch/pretrain.py --config ...
    scfm pretrain --config tiny [key.sub=value ...]     # installed: a shipped config by its name

The config keys and their defaults: `pretrain/config.py` (and the README's table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if not __package__:  # run as a script from a checkout (`python launch/X.py`, `deepspeed launch/X.py`): its code
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.conversion.fsio import FolderBusy  # noqa: E402
from data_pipeline.corpus import CorpusError  # noqa: E402
from data_pipeline.log_setup import add_verbosity_flags, setup_logging  # noqa: E402
from pretrain.checkpoint import ResumeError  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.threads import apply_threads, use_project_extension_dir  # noqa: E402
from pretrain.train import SetupError, train  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped with the package (launch/configs/*.yaml)


def config_path(name: str | None) -> str | None:
    """``--config``: a YAML file, else the name of a shipped config (``tiny``, ``celllm.yaml``), so that
    an installed package finds its configs from any folder. Raises FileNotFoundError naming both."""
    if not name or Path(name).is_file():
        return name
    shipped = CONFIGS / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if "/" not in name and shipped.is_file():
        return str(shipped)
    names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    raise FileNotFoundError(f"--config {name}: no such file, nor a shipped config (one of: {names})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file, or a shipped config by name: "
                                         + ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml"))))
    parser.add_argument("--resume", default=None,
                        help="'auto': continue from the run directory's latest complete checkpoint (if any); "
                             "or a checkpoint folder")
    parser.add_argument("--restart-epoch", action="store_true",
                        help="with --resume, on another world size or data.num_workers, or from a checkpoint saved "
                             "before loader state version 2: start the interrupted epoch "
                             "over (its cells seen before the interruption are seen again) instead of refusing")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    parser.add_argument("overrides", nargs="*", help="key.sub=value, e.g. schedule.max_steps=200 run.out=runs/x")
    add_verbosity_flags(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    use_project_extension_dir()  # before DeepSpeed builds its CPU op (it imports lazily): once per checkout
    try:
        config = load_config(config_path(args.config), args.overrides)
    except (ValueError, FileNotFoundError) as err:  # a config mistake: one line naming the fix, exit code 2
        parser.error(str(err))
    apply_threads(config.run.threads, config.data.num_workers)  # before any torch work sizes its pools
    import torch.distributed as dist

    try:
        summary = train(config, resume=args.resume, restart_epoch=args.restart_epoch)
    except (ResumeError, CorpusError, FolderBusy, SetupError) as err:  # the run's inputs, not a bug: one line
        print(f"error: {err}", file=sys.stderr, flush=True)
        _close_process_group()
        sys.exit(2)
    if summary.get("run_dir") and summary.get("final") is not None and summary.get("steps") is not None:
        if dist.get_rank() == 0:
            print(json.dumps(summary, indent=1))
    _close_process_group()


def _close_process_group() -> None:
    """NCCL warns (and can hang at exit) when its group is left to the interpreter; after a crash
    (another rank may be stuck in a collective) the group is left as it is."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as err:  # noqa: BLE001 - the run's outcome is already out; say it and go on
            print(f"warning: closing the process group: {err}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

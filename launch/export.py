"""Export a run (its latest complete checkpoint) or one checkpoint as a bundle downstream teams load
with `pretrain.load_pretrained`, without DeepSpeed:

    python launch/export.py RUN_OR_CHECKPOINT --out BUNDLE
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a script from a checkout (`python launch/X.py`, `deepspeed launch/X.py`): its code
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.log_setup import add_verbosity_flags, setup_logging  # noqa: E402
from pretrain.export import export_bundle  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run directory (run.out) or a checkpoints/step-N folder")
    parser.add_argument("--out", required=True,
                        help="bundle folder to write (an earlier bundle there is replaced; any other existing, "
                             "non-empty folder is refused)")
    parser.add_argument("--corpus", default=None,
                        help="the corpus the run trained on (folder or URL), where it is now; default: the run's "
                             "data.corpus (a relative path is read from the current folder)")
    add_verbosity_flags(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        print(export_bundle(args.source, args.out, corpus=args.corpus))
    except (ValueError, FileExistsError) as err:  # no, a damaged or a refused checkpoint, a refused --out
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()

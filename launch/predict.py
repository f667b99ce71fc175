"""Annotate cells with a fine-tuned bundle (`launch/finetune.py`'s RUN/bundle):

    python launch/predict.py RUN/bundle cells.h5ad --out annotated.h5ad [--threshold 0.5] [--name celltype]

The output is the input plus obs <name>_prediction (a label, or "unassigned" where the top
probability is below the threshold: scBERT's novel cell types), obs <name>_confidence, obsm
<name>_probabilities and uns <name>_classes (the probabilities' column order), in the input's order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if not __package__:  # run as a script from a checkout (`python launch/X.py`, `deepspeed launch/X.py`): its code
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.log_setup import add_verbosity_flags, setup_logging  # noqa: E402
from pretrain.downstream.finetune import predict_h5ad  # noqa: E402
from pretrain.embed import add_cell_input_arguments  # noqa: E402
from pretrain.threads import add_runtime_arguments, apply_threads  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="fine-tuned bundle folder (RUN/bundle of launch/finetune.py)")
    parser.add_argument("input", help=".h5ad with raw counts in X (or --layer)")
    parser.add_argument("--out", required=True, help="output .h5ad: the input plus the prediction columns")
    parser.add_argument("--name", default=None,
                        help="column prefix: obs['<name>_prediction'] ... (default: the label column fine-tuned on)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="top probability below which a cell is 'unassigned' (default: the bundle's labels.json)")
    parser.add_argument("--label-column", default=None,
                        help="obs column of true labels, if the input has them: the summary then scores the "
                             "predictions (macro-F1, accuracy, per-class F1, confusion matrix)")
    add_cell_input_arguments(parser)
    add_runtime_arguments(parser)
    add_verbosity_flags(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    apply_threads(args.threads)
    try:
        summary = predict_h5ad(args.bundle, args.input, args.out, name=args.name, threshold=args.threshold,
                               layer=args.layer, gene_column=args.gene_column, symbol_table=args.symbol_table,
                               min_coverage=args.min_coverage, token_budget=args.token_budget, device=args.device,
                               label_column=args.label_column)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

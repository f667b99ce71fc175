"""Moved to `data_pipeline.loading.masking`: this alias keeps code written against the old path
working, and says so once. New code: `from data_pipeline.loading.masking import ...` (or the names
`data_pipeline` exports)."""

import warnings

from .loading.masking import *  # noqa: F403

warnings.warn("data_pipeline.masking moved to data_pipeline.loading.masking: import from there (this alias will be "
              "removed)", DeprecationWarning, stacklevel=2)

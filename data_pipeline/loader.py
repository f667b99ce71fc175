"""Moved to `data_pipeline.loading.loader`: this alias keeps code written against the old path
working, and says so once. New code: `from data_pipeline.loading.loader import ...` (or the names
`data_pipeline` exports)."""

import warnings

from .loading.loader import *  # noqa: F403

warnings.warn("data_pipeline.loader moved to data_pipeline.loading.loader: import from there (this alias will be "
              "removed)", DeprecationWarning, stacklevel=2)

"""Moved to `data_pipeline.loading.normalize`: this alias keeps code written against the old path
working, and says so once. New code: `from data_pipeline.loading.normalize import ...` (or the names
`data_pipeline` exports)."""

import warnings

from .loading.normalize import *  # noqa: F403

warnings.warn("data_pipeline.normalize moved to data_pipeline.loading.normalize: import from there (this alias will be "
              "removed)", DeprecationWarning, stacklevel=2)

"""Moved to `data_pipeline.loading.epoch_plan`: this alias keeps code written against the old path
working, and says so once. New code: `from data_pipeline.loading.epoch_plan import ...` (or the names
`data_pipeline` exports)."""

import warnings

from .loading.epoch_plan import *  # noqa: F403

warnings.warn("data_pipeline.epoch_plan moved to data_pipeline.loading.epoch_plan: import from there (this alias will be "
              "removed)", DeprecationWarning, stacklevel=2)

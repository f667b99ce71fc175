"""TileDB-SOMA experiments as a converter `Source` (the CELLxGENE Census, or local experiments
written by ``tiledbsoma.io.from_h5ad``).

An input is a SOMA experiment when it is a URI (``tiledb://``, ``s3://``, ``gs://``, ``file://``
...: passed through to tiledbsoma untouched) or a local folder that is a TileDB group (it holds
``__tiledb_group.tdb``); `readers.open_source` routes both here. What is read from it:

- counts: ``ms[measurement].X[layer]`` (a sparse cells x genes array; Census: ``RNA`` / ``raw``),
  one read per row range of the points (obs joinids) of that range;
- genes: ``ms[measurement].var``, indexed by ``feature_id`` (Census) else the index column
  ``from_h5ad`` wrote (``var_id``); every string column is offered to `gene_ids` (which picks the
  Ensembl one, or ``--gene-column``);
- cells: ``obs`` rows matching the value filter (all rows without one), in ``soma_joinid``
  order; cell ids from ``obs_id`` (``from_h5ad``) else the joinid; label columns from obs.

Rows of this `Source` are the selected cells only: row ``r`` is the ``r``-th selected joinid. The
cells the filter left out are counted in ``cells_excluded`` (the converter reports them as
skipped, ``excluded_by_filter``), so every cell of the experiment is accounted for. The selected
joinids are kept as one int64 array (8 bytes per selected cell; none when they are a contiguous
range), found by one filtered scan of obs per open.

tiledbsoma is imported only here, and only when such an input is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .buffers import Buffers
from .source import _DAMAGED, Source, SourceError, _to_str_array, _values

_GENE_ID_COLUMNS = ("feature_id", "var_id")  # Census, then from_h5ad's default index column
_CELL_ID_COLUMNS = ("obs_id",)               # from_h5ad's default index column
_FILTER_EXAMPLE = "\"is_primary_data == True and disease == 'normal'\""


@dataclass(frozen=True)
class SomaSelection:
    """What is read from a SOMA experiment: ``measurement`` (``--soma-measurement``), its X
    ``layer`` (``--soma-layer``) and an obs value ``obs_filter`` (``--soma-filter``; None: all
    cells), in TileDB-SOMA's value-filter syntax."""

    measurement: str = "RNA"
    layer: str = "raw"
    obs_filter: str | None = None


def _first_line(exc: Exception) -> str:
    # tiledbsoma appends a C++ traceback ("At: ...") to some messages
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _is_text(arrow_type) -> bool:
    """Whether an Arrow column holds strings (plain or dictionary-encoded, as Census var is)."""
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _strings(column) -> np.ndarray:
    """An Arrow column (any type, nulls included) as `readers._to_str_array` gives values: str,
    None where missing.  [n] object"""
    return _to_str_array(np.array(column.to_pylist(), dtype=object))


def _coords(joinids: np.ndarray | None, lo: int, start: int, stop: int):
    """SOMA coordinates of rows ``start:stop``: an inclusive slice of a contiguous selection
    (``joinids`` None, first joinid ``lo``), else the selected joinids themselves."""
    if joinids is None:
        return slice(lo + start, lo + stop - 1)
    return joinids[start:stop]


class SomaSource(Source):
    """One SOMA experiment (``uri``) read as cells x genes, rows = the cells ``selection`` keeps."""

    def __init__(self, uri: str | Path, selection: SomaSelection | None = None):
        self.path, self.format = uri, "soma"
        self.selection = selection = selection or SomaSelection()
        self.matrix = f"{selection.measurement}/X/{selection.layer}"
        try:
            import tiledbsoma
        except ImportError:
            raise SourceError(f"{uri}: reading a TileDB-SOMA experiment needs the tiledbsoma package: "
                              "pip install tiledbsoma (it is in the project's requirements.txt)") from None
        # TileDB is not fork-safe (a child forked after the parent read an experiment hangs, even
        # with a context of its own): pools reading SOMA inputs are spawned, `readers.pool_start_method`
        try:
            self._exp = tiledbsoma.Experiment.open(str(uri))
        except tiledbsoma.DoesNotExistError:
            raise SourceError(f"{uri}: no TileDB-SOMA object there; check the path or URI") from None
        except tiledbsoma.SOMAError as exc:
            raise SourceError(f"{uri}: not a TileDB-SOMA experiment ({_first_line(exc)}); pass the "
                              "experiment itself (for the Census: .../soma/census_data/homo_sapiens, not "
                              "the release's top collection)") from None
        try:
            self._open(tiledbsoma)
        except BaseException:
            self.close()
            raise

    def _open(self, tiledbsoma):
        uri, sel, exp = self.path, self.selection, self._exp
        measurements = list(exp.ms.keys()) if "ms" in exp else []
        if sel.measurement not in measurements:
            raise SourceError(f"{uri}: no measurement {sel.measurement!r} (measurements: "
                              f"{', '.join(measurements) or 'none'}); choose one with --soma-measurement")
        ms = exp.ms[sel.measurement]
        layers = list(ms.X.keys()) if "X" in ms else []
        if sel.layer not in layers:
            raise SourceError(f"{uri}: measurement {sel.measurement!r} has no X layer {sel.layer!r} "
                              f"(layers: {', '.join(layers) or 'none'}); choose one with --soma-layer")
        self._x = ms.X[sel.layer]
        if not isinstance(self._x, tiledbsoma.SparseNDArray):
            raise SourceError(f"{uri}: X layer {sel.layer!r} is a {self._x.soma_type}, not a sparse count "
                              "matrix; choose a sparse layer with --soma-layer")
        self._read_var(ms.var)
        self._obs_schema = exp.obs.schema
        self._select_cells(tiledbsoma)
        self.compressed = True  # TileDB tiles are compressed: the scan's row cache pays off

    def _read_var(self, var_frame) -> None:
        """``var`` (index: gene ids column, columns: the other string columns) and the column of
        each var joinid (X's second coordinate)."""
        table = var_frame.read().concat()
        joinids = table.column("soma_joinid").to_numpy()
        order = np.argsort(joinids, kind="stable")
        self._var_joinids = joinids[order]
        self.n_vars = len(joinids)
        # var joinids 0..n-1 (Census, from_h5ad): X's column coordinate is the column itself
        self._var_identity = bool(self.n_vars == 0 or (self._var_joinids[0] == 0
                                                       and self._var_joinids[-1] == self.n_vars - 1))
        text = {f.name: _strings(table.column(f.name))[order]
                for f in table.schema if f.name != "soma_joinid" and _is_text(f.type)}
        index_col = next((c for c in _GENE_ID_COLUMNS if c in text), None)
        index = text.pop(index_col) if index_col else np.array([str(j) for j in self._var_joinids], dtype=object)
        self.var = pd.DataFrame(text, index=pd.Index(index, dtype=object))

    def _select_cells(self, tiledbsoma) -> None:
        """The selected obs joinids (sorted), without reading obs when there is no filter and the
        joinids are a contiguous range (then only their first is kept)."""
        uri, obs, flt = self.path, self._exp.obs, self.selection.obs_filter
        n_total = int(obs.count)
        (lo, hi), = obs.non_empty_domain() or ((0, -1),)
        if not flt and n_total == hi - lo + 1:
            self._joinids, self._lo, self.n_cells = None, int(lo), n_total
            self.cells_excluded = 0
            return
        parts = []
        try:
            for table in obs.read(column_names=["soma_joinid"], value_filter=flt or None):
                parts.append(table.column("soma_joinid").to_numpy())
        except (tiledbsoma.SOMAError, ValueError, TypeError) as exc:
            columns = ", ".join(n for n in self._obs_schema.names if n != "soma_joinid")
            raise SourceError(f"{uri}: --soma-filter {flt!r} cannot be applied to obs ({_first_line(exc)}); "
                              f"obs columns: {columns}; write a TileDB-SOMA value filter such as "
                              f"{_FILTER_EXAMPLE} (strings quoted, == for equality)") from None
        joinids = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        self._joinids, self._lo, self.n_cells = joinids.astype(np.int64, copy=False), 0, len(joinids)
        self.cells_excluded = n_total - self.n_cells

    def obs_columns(self) -> list[str]:
        return [n for n in self._obs_schema.names if n != "soma_joinid"]

    def _obs_table(self, columns: list[str], start: int, stop: int):
        """Obs rows of source rows ``start:stop`` (in row order) with ``columns``: pyarrow Table."""
        import pyarrow as pa

        names = ["soma_joinid", *columns]
        if stop <= start:
            return pa.table({n: pa.array([], self._obs_schema.field(n).type) for n in names})
        if self._joinids is not None and start == 0 and stop == self.n_cells:
            # every selected cell (label categories at planning): the filter again, not a point per cell
            read = dict(value_filter=self.selection.obs_filter)
        else:
            read = dict(coords=(_coords(self._joinids, self._lo, start, stop),))
        table = self._exp.obs.read(column_names=names, **read).concat()
        joinids = table.column("soma_joinid").to_numpy()
        expected = (np.arange(self._lo + start, self._lo + stop) if self._joinids is None
                    else self._joinids[start:stop])
        order = np.argsort(joinids, kind="stable")
        if len(joinids) != len(expected) or not np.array_equal(joinids[order], expected):
            raise SourceError(f"{self.path}: obs rows {start}:{stop} returned {len(joinids)} cells for "
                              f"{len(expected)} joinids; {_DAMAGED}")
        return table.take(pa.array(order))

    def _obs_names(self, start: int, stop: int) -> np.ndarray:
        column = next((c for c in _CELL_ID_COLUMNS if c in self._obs_schema.names), None)
        table = self._obs_table([column] if column else [], start, stop)
        return _strings(table.column(column or "soma_joinid"))

    def _obs_values(self, name: str, start: int, stop: int) -> np.ndarray:
        return _strings(self._obs_table([name], start, stop).column(name))

    def _read_rows(self, start: int, stop: int, buffers: Buffers | None) -> sp.csr_matrix:
        n = stop - start
        dtype = _values(np.zeros(0, self._x.schema.field("soma_data").type.to_pandas_dtype())).dtype
        if n == 0:
            return sp.csr_matrix((0, self.n_vars), dtype=dtype)
        table = self._x.read(coords=(_coords(self._joinids, self._lo, start, stop),)).tables().concat()
        dim0 = table.column("soma_dim_0").to_numpy()
        dim1 = table.column("soma_dim_1").to_numpy()
        data = _values(table.column("soma_data").to_numpy())
        if self._joinids is None:
            rows = dim0 - (self._lo + start)
        else:
            chunk = self._joinids[start:stop]
            rows = np.searchsorted(chunk, dim0)
            if len(rows) and (rows.max() >= n or not np.array_equal(chunk[rows], dim0)):
                raise SourceError(f"{self.path}: rows {start}:{stop}: X returned cells outside the ones "
                                  f"asked for; {_DAMAGED}")
        if self._var_identity:
            cols = dim1
        else:
            cols = np.searchsorted(self._var_joinids, dim1)
        if len(cols) and (cols.min() < 0 or cols.max() >= self.n_vars
                          or (not self._var_identity and not np.array_equal(self._var_joinids[cols], dim1))):
            raise SourceError(f"{self.path}: rows {start}:{stop} hold a gene coordinate that is not a var "
                              f"joinid of measurement {self.selection.measurement!r}; {_DAMAGED}")
        return sp.csr_matrix((data, (rows, cols)), shape=(n, self.n_vars), dtype=dtype)

    def close(self):
        exp = getattr(self, "_exp", None)
        if exp is not None:
            exp.close()
            self._exp = None

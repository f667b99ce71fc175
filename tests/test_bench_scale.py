"""The scaling benchmark's arithmetic: log-log fits, what it flags, the projection (no conversion run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_scale import fits, label, parse_size, projection  # noqa: E402


def _row(cpu: float, main: int, worker: int = 0) -> dict:
    return {"wall_s": cpu, "cpu_s": cpu, "user_s": cpu, "sys_s": 0.0, "max_rss_any_process": max(main, worker),
            "main_peak_rss": main, "worker_peak_rss": worker, "other_cores_busy": 0.0}


def _size(cells: int, convert_cpu: float, worker_rss: int, merge_rss: int) -> dict:
    return {"cells": cells, "label": label(cells), "atlas": {"bytes": 16_000 * cells},
            "corpus": {"disk_bytes": 8_000 * cells},
            "disk_needed_bytes": {"peak_during_run": 32_000 * cells},
            "steps": {"convert_built": _row(convert_cpu, 1 << 30, worker_rss),
                      "merge": _row(0.006e-3 * cells, merge_rss),
                      "verify": _row(20e-6 * cells ** 1.5 / 1000, 200 << 20)}}


def _result(sizes: list[dict]) -> dict:
    return {"device": {"cpu": "test", "cores": 2}, "sizes": sizes}


def test_sizes_parse_and_print():
    assert parse_size("0.25M") == 250_000 and parse_size("10m") == 10_000_000 and parse_size("20k") == 20_000
    assert label(250_000) == "250k" and label(1_000_000) == "1M"


def test_linear_time_and_flat_memory_flag_nothing():
    r = _result([_size(250_000, 25.0, 800 << 20, 900 << 20), _size(1_000_000, 100.0, 810 << 20, 905 << 20)])
    f, defects, _ = fits(r)
    assert f["convert_built"]["cpu_s_slope"] == pytest.approx(1.0)
    assert f["convert_built"]["cpu_us_per_cell"] == pytest.approx([100.0, 100.0])
    assert not [d for d in defects if not d.startswith("verify")]
    assert any(d.startswith("verify: CPU time grows as cells^1.50") for d in defects)  # the superlinear step


def test_growing_memory_is_flagged_and_projected_linearly():
    r = _result([_size(250_000, 25.0, 800 << 20, 900 << 20), _size(1_000_000, 100.0, 1800 << 20, 905 << 20)])
    r["fits"], defects, _ = fits(r)
    assert any(d.startswith("convert_built: worker peak rss grows") for d in defects)
    per_cell = (1000 << 20) / 750_000
    assert r["fits"]["convert_built"]["worker_peak_rss_bytes_per_added_cell"] == pytest.approx(per_cell)
    p = projection(r, node_cores=64, nodes=8, efficiency=1.0, node_disk_gbs=1e9, fs_gbs=1e9)
    t30 = p["targets"][0]
    assert t30["cells"] == 30e6 and t30["corpus_disk_bytes"] == pytest.approx(8_000 * 30e6)
    built = t30["convert_built"]
    assert built["cpu_hours"] == pytest.approx(100.0 * 30 / 3600)  # linear from 1M cells
    assert built["one_node_hours"] == pytest.approx(100.0 * 30 / 64 / 3600)
    assert built["8_nodes_hours"] == pytest.approx(100.0 * 30 / 512 / 3600 + 6.0 * 30 / 3600)  # + the merge
    assert built["worker_rss_bytes"] == pytest.approx((1800 << 20) + per_cell * 29e6)


def _with_sketch(r: dict, entries: list[int], window: list[int]) -> dict:
    for size, e, w in zip(r["sizes"], entries, window):
        size["merge_window"] = {"sketch_entries": e, "buckets": w, "bytes": 8 * w, "cap_bytes": 8 << 27}
    return r


def test_merge_memory_that_follows_the_sketch_is_bounded_not_a_defect():
    """The merge holds the median sketch, which grows with the values genes take (saturating) up
    to a capped window: growth it explains is reported with its bound."""
    r = _with_sketch(_result([_size(250_000, 25.0, 800 << 20, 864 << 20), _size(1_000_000, 100.0, 800 << 20,
                                                                                955 << 20)]),
                     entries=[19_100_000, 22_400_000], window=[25_400_000, 26_600_000])
    _, defects, bounded = fits(r)
    assert not [d for d in defects if d.startswith("merge")], defects
    (only,) = bounded
    per_entry = (955 - 864 << 20) / (22_400_000 - 19_100_000)  # bytes the merge took per added sketch entry
    limit = (955 << 20) + per_entry * ((1 << 27) - 22_400_000)
    assert only.startswith("merge: main peak rss grows from 864 MiB to 955 MiB") and f"{limit / 2**30:.1f} GiB" in only


def test_merge_memory_the_sketch_does_not_explain_is_a_defect():
    r = _with_sketch(_result([_size(250_000, 25.0, 800 << 20, 864 << 20), _size(1_000_000, 100.0, 800 << 20,
                                                                                1500 << 20)]),
                     entries=[19_100_000, 22_400_000], window=[25_400_000, 26_600_000])
    _, defects, bounded = fits(r)
    assert any(d.startswith("merge: main peak rss grows") for d in defects) and not bounded


def test_the_disk_bounds_the_projection():
    r = _result([_size(250_000, 25.0, 800 << 20, 900 << 20), _size(1_000_000, 100.0, 800 << 20, 900 << 20)])
    r["fits"], _, _ = fits(r)
    p = projection(r, node_cores=64, nodes=8, efficiency=1.0, node_disk_gbs=1.0, fs_gbs=4.0)
    built = p["targets"][0]["convert_built"]
    io_bytes = (16_000 + 8_000) * 30e6 / 1e9  # GB read and written
    assert built["one_node_hours"] == pytest.approx(io_bytes / 1.0 / 3600)
    assert built["io_bound_8_nodes_hours"] == pytest.approx(io_bytes / 4.0 / 3600)  # the shared filesystem's limit


def test_a_worker_seen_to_stop_growing_is_projected_flat():
    r = _result([_size(250_000, 25.0, 800 << 20, 900 << 20), _size(1_000_000, 100.0, 1800 << 20, 905 << 20)])
    r["sizes"][-1]["convert_worker_trace"] = {"plateau": True}
    r["fits"], _, _ = fits(r)
    p = projection(r, node_cores=64, nodes=8, efficiency=1.0)
    assert p["targets"][-1]["convert_built"]["worker_rss_bytes"] == 1800 << 20

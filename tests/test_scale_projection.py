"""The cluster projection's arithmetic: ZeRO traffic and epoch time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from scale_projection import project, traffic_bytes  # noqa: E402


def test_traffic_by_zero_stage():
    p, world = 10_000_000, 64
    f = (world - 1) / world
    assert traffic_bytes(1, p, 1, 4) == 0  # one rank sends nothing
    assert traffic_bytes(1, p, world, 4) == pytest.approx(2 * f * 2 * p)
    assert traffic_bytes(2, p, world, 4) == pytest.approx(5 * f * 2 * p)   # gradients every micro-step
    assert traffic_bytes(3, p, world, 4) == pytest.approx(12 * f * 2 * p)  # gather, gather, reduce per micro-step
    assert traffic_bytes(2, p, world, 1) < traffic_bytes(3, p, world, 1)


def test_epoch_time_is_compute_plus_or_max_communication():
    one = project(cells_per_s=100.0, cells_per_step=50.0, params=10_000_000, cells=1e6, nodes=1, gpus_per_node=1,
                  stage=2, micro_steps=1, inter_gbs=40.0, intra_gbs=300.0)
    assert one["comm_s_per_step"] == 0 and one["scaling_efficiency"] == [1.0, 1.0]
    assert one["epoch_hours_no_overlap"] == pytest.approx(1e6 / 100.0 / 3600)
    many = project(100.0, 50.0, 10_000_000, 1e6, nodes=8, gpus_per_node=8, stage=2, micro_steps=1,
                   inter_gbs=40.0, intra_gbs=300.0)
    compute, comm = 0.5, 2 * (63 / 64) * 2e7 / 40e9
    assert many["comm_s_per_step"] == pytest.approx(comm)
    assert many["epoch_hours_no_overlap"] == pytest.approx(1e6 / (64 * 50) * (compute + comm) / 3600)
    assert many["epoch_hours_full_overlap"] == pytest.approx(1e6 / (64 * 50) * compute / 3600)

"""The nodes of a multi-node conversion: failure records, heartbeats, and the waits that read them
(`data_pipeline.conversion.nodes`). The conversions that use them: tests/test_mtx_index.py."""

from __future__ import annotations

import time

import pytest

from data_pipeline.conversion import nodes


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(nodes, "WAIT_POLL_S", 0.01)
    monkeypatch.setattr(nodes, "HEARTBEAT_S", 0.01)
    monkeypatch.setattr(nodes, "HEARTBEAT_STALE_S", 0.3)


def test_only_a_failure_of_a_node_whose_share_is_missing_stops_the_wait(tmp_path, fast):
    """Item i of a stage is node i % num_nodes's: node 2's failure (its share done) does not stop node 0
    waiting for node 1's item; node 1's does."""
    nodes.failure_path(tmp_path, 2).write_text("OSError: disk full\n")
    assert nodes.wait_for_nodes(lambda: [4], 3, 0.1, "gene scans", tmp_path, 0) == [4]
    nodes.failure_path(tmp_path, 1).write_text("ConvertError: bad input\n")
    with pytest.raises(nodes.OtherNodeFailed, match=r"node 1 stopped with an error .*bad input"):
        nodes.wait_for_nodes(lambda: [4], 3, 60, "gene scans", tmp_path, 0)


def test_a_beating_node_is_waited_for_and_a_stale_one_is_not(tmp_path, fast):
    """A node whose heartbeat changes is waited for as long as ``wait_s`` (longer than the staleness
    limit); one whose heartbeat stopped changing stops the wait after HEARTBEAT_STALE_S, and only when
    its share is missing; a node with no heartbeat (not started) is waited for."""
    with nodes.heartbeat(tmp_path, 1):
        start = time.monotonic()
        assert nodes.wait_for_nodes(lambda: [1], 2, 1.0, "gene scans", tmp_path, 0) == [1]
        assert time.monotonic() - start >= 1.0
    assert nodes.wait_for_nodes(lambda: [1], 2, 0.5, "gene scans", tmp_path, 0) == [1]  # none: not started

    nodes.heartbeat_path(tmp_path, 1).write_text("host h pid 1 beat 7\n")  # what a killed node leaves
    assert nodes.wait_for_nodes(lambda: [2], 2, 0.5, "gene scans", tmp_path, 0) == [2]  # node 0's own item
    start = time.monotonic()
    with pytest.raises(nodes.OtherNodeFailed, match=r"node 1 stopped without recording an error: its heartbeat "
                                                    r"\(.*node-1.alive: host h pid 1 beat 7\) has not changed"):
        nodes.wait_for_nodes(lambda: [3, 4], 2, 60, "gene scans", tmp_path, 0)
    assert 0.3 <= time.monotonic() - start < 30


def test_a_heartbeat_goes_with_its_node_unless_the_node_is_interrupted(tmp_path, fast):
    """Gone after a result and after an error (the error is recorded instead); left after an interrupt,
    which to the waiting nodes is a kill. It changes while the block runs."""
    path = nodes.heartbeat_path(tmp_path, 3)
    with nodes.heartbeat(tmp_path, 3):
        first = path.read_text() if path.exists() else None
        deadline = time.monotonic() + 10
        while (not path.exists() or path.read_text() == first) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert path.read_text() != first
    assert not path.exists()
    with pytest.raises(ValueError), nodes.heartbeat(tmp_path, 3):
        raise ValueError("bad input")
    assert not path.exists()
    with pytest.raises(KeyboardInterrupt), nodes.heartbeat(tmp_path, 3):
        raise KeyboardInterrupt
    assert path.exists()


def test_a_failure_is_recorded_unless_another_node_caused_it(tmp_path):
    nodes.record_failure(tmp_path, 0, OSError(28, "No space left on device"))
    assert nodes.failure_path(tmp_path, 0).read_text() == "OSError: [Errno 28] No space left on device\n"
    nodes.record_failure(tmp_path, 1, nodes.OtherNodeFailed("node 0 stopped"))
    assert not nodes.failure_path(tmp_path, 1).exists()
    nodes.record_failure(tmp_path / "gone", 2, ValueError("x"))  # no work folder: nothing to write into
    assert not (tmp_path / "gone").exists()

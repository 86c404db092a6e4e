"""router.topology: link classes between placements, bandwidth sources and the calibration reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.topology import (
    DEFAULT_GBPS,
    CalibrationError,
    LinkClass,
    Placement,
    Topology,
    load_calibration,
    parse_link_class,
)

pytestmark = pytest.mark.unit

PLACEMENTS = {
    "a": Placement(node="n1", nvlink_domain="nv1", rack="r1", process="proc1"),
    "b": Placement(node="n1", nvlink_domain="nv1", rack="r1", process="proc1"),  # same process as a
    "c": Placement(node="n1", nvlink_domain="nv1", rack="r1"),  # same NVLink island as a
    "d": Placement(node="n1", rack="r1"),  # same node, no NVLink with a
    "e": Placement(node="n2", rack="r1"),  # same rack
    "f": Placement(node="n3", rack="r2"),  # another rack
    "g": Placement(node="n4"),  # rack unknown
}


def test_link_classes() -> None:
    topo = Topology.build(PLACEMENTS)
    assert topo.link("a", "a") is None
    assert topo.link("a", "b") is LinkClass.SAME_PROCESS
    assert topo.link("a", "c") is LinkClass.NVLINK
    assert topo.link("a", "d") is LinkClass.SHM
    assert topo.link("d", "e") is LinkClass.IB
    assert topo.link("e", "f") is LinkClass.TCP
    assert topo.link("f", "g") is LinkClass.TCP
    assert topo.link("a", "nobody") is LinkClass.TCP  # unknown placement: pessimistic
    assert Topology.build(PLACEMENTS, same_node_link="pcie").link("a", "d") is LinkClass.PCIE


def test_transfer_time_uses_link_bandwidth() -> None:
    topo = Topology.build(PLACEMENTS, link_gbps={"shm": 10.0, "tcp": 2.0})
    assert topo.transfer_time_s(10**9, "a", "d") == pytest.approx(0.1, rel=1e-12)
    assert topo.transfer_time_s(10**9, "e", "f") == pytest.approx(0.5, rel=1e-12)
    assert topo.transfer_time_s(10**9, "a", "a") == 0.0
    assert topo.transfer_time_s(0, "e", "f") == 0.0


def test_parse_link_class_aliases() -> None:
    assert parse_link_class("SHM") is LinkClass.SHM
    assert parse_link_class("cma") is LinkClass.SHM
    assert parse_link_class("nixl-tcp") is LinkClass.TCP
    assert parse_link_class("ucxx_shm") is LinkClass.SHM
    assert parse_link_class("rdma") is LinkClass.IB
    assert parse_link_class("carrier-pigeon") is None


def _write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(doc))
    return path


def test_calibration_file_and_precedence(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "transports": {"shm": {"gbps": 11.0}, "cma": {"gbps": 12.5}, "tcp": 2.0, "quic": {"gbps": 3.0}},
            "x": 1,
        },
    )
    measured, ignored = load_calibration(path)
    assert measured == {LinkClass.SHM: 12.5, LinkClass.TCP: 2.0}  # the faster of shm/cma wins
    assert ignored == ["quic"]
    topo = Topology.build(PLACEMENTS, calibration_file=path, link_gbps={"tcp": 3.0})
    assert topo.gbps[LinkClass.SHM] == 12.5  # calibration over defaults
    assert topo.gbps[LinkClass.TCP] == 3.0  # explicit configuration over calibration
    assert topo.gbps[LinkClass.IB] == DEFAULT_GBPS[LinkClass.IB]
    assert topo.ignored_calibration == ["quic"]


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"shm": {"gbps": 1.0}}, 'expected an object with a "transports" key'),
        ([1, 2], 'expected an object with a "transports" key'),
        ({"transports": [1]}, '"transports" must be an object of name -> {"gbps": number}'),
        ({"transports": {"shm": {"gbps": "fast"}}}, "transports.shm.gbps must be a number, got 'fast'"),
        ({"transports": {"shm": {}}}, "transports.shm.gbps must be a number, got None"),
        ({"transports": {"tcp": {"gbps": -1}}}, "transports.tcp.gbps must be > 0, got -1"),
        ({"transports": {"tcp": True}}, "transports.tcp.gbps must be a number, got True"),
    ],
)
def test_calibration_errors_name_the_key(tmp_path: Path, doc: object, needle: str) -> None:
    path = _write(tmp_path, doc)
    with pytest.raises(CalibrationError) as info:
        load_calibration(path)
    assert str(info.value) == f"{path}: {needle}"


def test_calibration_unreadable_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="cannot read calibration file"):
        load_calibration(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CalibrationError, match=r"bad\.json: not JSON .* line 1 column 2"):
        load_calibration(bad)


def test_bad_explicit_configuration() -> None:
    with pytest.raises(ValueError, match="unknown link classes"):
        Topology.build(PLACEMENTS, link_gbps={"warp": 9.0})
    with pytest.raises(ValueError, match="same_node_link must be shm, pcie or nvlink"):
        Topology.build(PLACEMENTS, same_node_link="tcp")

"""Where workers sit and how fast KV moves between two of them (pure; no ray, no ucx).

Owns the link classification the router's cost model prices a KV handoff with, and the bandwidth of
each link class, from built-in nominal figures, a calibration file written by
``tandem kv-bench --calibration FILE``, and explicit configuration (later wins)::

    same worker            -> no transfer
    same process           -> SAME_PROCESS
    same NVLink domain     -> NVLINK   (a GPU node's NVLink island, or a multi-node NVL domain)
    same node otherwise    -> the node's intra-node transport: SHM (CPU boxes, CMA) or PCIE
    same rack              -> IB
    anything else, or a worker without a placement -> TCP (the pessimistic guess)

Bandwidths are in GB/s (10^9 bytes per second), the unit kv-bench prints. The calibration file::

    {"transports": {"shm": {"gbps": 11.0}, "tcp": {"gbps": 2.0}, ...}}

A transport may also be a bare number; names are matched loosely (``cma`` -> shm, ``rdma`` /
``infiniband`` -> ib, ``ucx_tcp`` -> tcp). Unknown names are reported, never guessed.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LinkClass(enum.StrEnum):
    SAME_PROCESS = "same_process"
    NVLINK = "nvlink"
    SHM = "shm"
    PCIE = "pcie"
    IB = "ib"
    TCP = "tcp"


# Nominal GB/s used only where neither calibration nor configuration says otherwise. The CPU figures
# are this project's loopback measurements (MEASURED.md); the GPU ones are per-direction datasheet
# rates (NVLink 4, PCIe 5 x16, 200 Gb/s InfiniBand) derated to what a transfer engine reaches.
DEFAULT_GBPS: dict[LinkClass, float] = {
    LinkClass.SAME_PROCESS: 12.0,
    LinkClass.NVLINK: 300.0,
    LinkClass.SHM: 10.0,
    LinkClass.PCIE: 20.0,
    LinkClass.IB: 20.0,
    LinkClass.TCP: 1.0,
}

_ALIASES: dict[str, LinkClass] = {
    "same_process": LinkClass.SAME_PROCESS,
    "local": LinkClass.SAME_PROCESS,
    "inproc": LinkClass.SAME_PROCESS,
    "nvlink": LinkClass.NVLINK,
    "shm": LinkClass.SHM,
    "sm": LinkClass.SHM,
    "cma": LinkClass.SHM,
    "posix": LinkClass.SHM,
    "pcie": LinkClass.PCIE,
    "ib": LinkClass.IB,
    "rdma": LinkClass.IB,
    "rc": LinkClass.IB,
    "infiniband": LinkClass.IB,
    "roce": LinkClass.IB,
    "tcp": LinkClass.TCP,
}


class CalibrationError(ValueError):
    """A calibration file cannot be used; the message names the file and the offending key."""


def parse_link_class(name: str) -> LinkClass | None:
    """``"shm"``, ``"SHM"``, ``"ucx-cma"``, ``"nixl_tcp"`` ... -> a link class; None when unknown."""
    key = name.strip().lower().replace("-", "_")
    if key in _ALIASES:
        return _ALIASES[key]
    # "nixl_tcp", "ucxx_shm": a backend prefix before the transport name.
    last = key.rsplit("_", 1)[-1]
    return _ALIASES.get(last)


def parse_calibration(data: Any, source: str = "<calibration>") -> tuple[dict[LinkClass, float], list[str]]:
    """Bandwidths (GB/s) by link class from a parsed calibration document, and the names it ignored.

    Where several names map to one class (``shm`` and ``cma``), the highest figure wins: it is what
    the fastest available transport on that link reaches.
    """
    if not isinstance(data, Mapping) or "transports" not in data:
        raise CalibrationError(f'{source}: expected an object with a "transports" key')
    transports = data["transports"]
    if not isinstance(transports, Mapping):
        raise CalibrationError(f'{source}: "transports" must be an object of name -> {{"gbps": number}}')
    out: dict[LinkClass, float] = {}
    ignored: list[str] = []
    for name, entry in transports.items():
        gbps = entry.get("gbps") if isinstance(entry, Mapping) else entry
        if isinstance(gbps, bool) or not isinstance(gbps, int | float):
            raise CalibrationError(f"{source}: transports.{name}.gbps must be a number, got {gbps!r}")
        if not math.isfinite(gbps) or gbps <= 0:
            raise CalibrationError(f"{source}: transports.{name}.gbps must be > 0, got {gbps}")
        link = parse_link_class(str(name))
        if link is None:
            ignored.append(str(name))
            continue
        out[link] = max(out.get(link, 0.0), float(gbps))
    return out, ignored


def load_calibration(path: str | Path) -> tuple[dict[LinkClass, float], list[str]]:
    """Read a ``tandem kv-bench --calibration`` file; see :func:`parse_calibration`."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise CalibrationError(f"{p}: cannot read calibration file ({e.strerror or e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{p}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    return parse_calibration(data, str(p))


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one worker runs. ``None`` fields are unknown and never match another worker's."""

    node: str
    nvlink_domain: str | None = None
    rack: str | None = None
    process: str | None = None  # workers sharing a process (tests, the embedded default)


@dataclass(slots=True)
class Topology:
    """Worker placements plus a bandwidth per link class; answers link(a, b) and transfer time."""

    placements: dict[str, Placement] = field(default_factory=dict)
    gbps: dict[LinkClass, float] = field(default_factory=lambda: dict(DEFAULT_GBPS))
    same_node_link: LinkClass = LinkClass.SHM  # SHM on CPU boxes, PCIE between GPUs without NVLink
    ignored_calibration: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        placements: Mapping[str, Placement],
        *,
        link_gbps: Mapping[str, float] | None = None,
        calibration_file: str | Path | None = None,
        same_node_link: str = "shm",
    ) -> Topology:
        """Defaults, then the calibration file, then explicit ``link_gbps`` (names as in the file)."""
        gbps = dict(DEFAULT_GBPS)
        ignored: list[str] = []
        if calibration_file is not None:
            measured, ignored = load_calibration(calibration_file)
            gbps.update(measured)
        if link_gbps:
            explicit, unknown = parse_calibration({"transports": dict(link_gbps)}, "link_gbps")
            if unknown:
                raise ValueError(
                    f"link_gbps: unknown link classes {unknown}; known: {[c.value for c in LinkClass]}"
                )
            gbps.update(explicit)
        snl = parse_link_class(same_node_link)
        if snl not in (LinkClass.SHM, LinkClass.PCIE, LinkClass.NVLINK):
            raise ValueError(f"same_node_link must be shm, pcie or nvlink, got {same_node_link!r}")
        return cls(dict(placements), gbps, snl, ignored)

    def link(self, a: str, b: str) -> LinkClass | None:
        """The link a KV handoff from worker ``a`` to worker ``b`` crosses; None when a == b."""
        if a == b:
            return None
        pa, pb = self.placements.get(a), self.placements.get(b)
        if pa is None or pb is None:
            return LinkClass.TCP
        if pa.process is not None and pa.process == pb.process:
            return LinkClass.SAME_PROCESS
        if pa.nvlink_domain is not None and pa.nvlink_domain == pb.nvlink_domain:
            return LinkClass.NVLINK
        if pa.node == pb.node:
            return self.same_node_link
        if pa.rack is not None and pa.rack == pb.rack:
            return LinkClass.IB
        return LinkClass.TCP

    def bytes_per_s(self, link: LinkClass) -> float:
        return self.gbps[link] * 1e9

    def transfer_time_s(self, nbytes: int, a: str, b: str) -> float:
        """Seconds to move ``nbytes`` of KV from ``a`` to ``b`` (0 within one worker)."""
        link = self.link(a, b)
        if link is None or nbytes <= 0:
            return 0.0
        return nbytes / self.bytes_per_s(link)

"""Where this host sits in a job over several hosts: plait's own launcher flags, and the network.

plait starts a job's ranks itself (``plait train``, ``plait generate``) or runs under torchrun.
Over several hosts, each host starts its share with the same command and its own node rank::

    host a$ plait train job.yaml --nnodes 2 --node-rank 0 --master-addr a --master-port 29500
    host b$ plait train job.yaml --nnodes 2 --node-rank 1 --master-addr a --master-port 29500

which is what ``torchrun --nnodes 2 --node-rank N --nproc-per-node W/2 --master-addr a
--master-port 29500`` would do: host ``n`` runs global ranks ``n*L .. n*L+L-1`` (``L = W / nnodes``),
numbered consecutively so that TP, the innermost mesh axis, stays inside a host
(:meth:`plait.ParallelConfig.check_hosts` refuses a layout where it would not). Rank 0, on node 0,
holds the rendezvous store at ``--master-addr:--master-port``.

gloo binds to the address its host name resolves to and falls back to the loopback address,
which other hosts cannot reach; :func:`choose_gloo_interface` points it at the interface that
routes to the master address instead (``GLOO_SOCKET_IFNAME`` set by the user wins).
"""
from __future__ import annotations

import argparse
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Optional

from .argtypes import int_in, non_negative_int, positive_int

log = logging.getLogger("plait.nodes")

DEFAULT_MASTER_PORT = 29500        # torchrun's
_SIOCGIFADDR = 0x8915              # Linux ioctl: an interface's IPv4 address


@dataclass(frozen=True)
class NodeSpec:
    """This host's place in a job of ``nnodes`` hosts; ``master_addr:master_port`` is node 0's store."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: Optional[int] = None     # None: a free local port (one host only)

    def __post_init__(self) -> None:
        for name in ("nnodes", "node_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.nnodes < 1:
            raise ValueError(f"--nnodes must be at least 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1} (--nnodes {self.nnodes})")
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise ValueError(f"--master-port must be in [1, 65535], got {self.master_port}")
        if not self.master_addr or any(c.isspace() for c in self.master_addr):
            raise ValueError(f"--master-addr must be a host name or address, got {self.master_addr!r}")

    @property
    def multi_host(self) -> bool:
        return self.nnodes > 1

    def local_ranks(self, world_size: int) -> range:
        """The global ranks this host runs: a consecutive block of ``world_size / nnodes``."""
        if world_size % self.nnodes:
            raise ValueError(f"{world_size} ranks do not split evenly over --nnodes {self.nnodes}; every host "
                             f"runs the same number of ranks, so make dp*pp*tp a multiple of {self.nnodes}")
        local = world_size // self.nnodes
        return range(self.node_rank * local, (self.node_rank + 1) * local)

    def describe(self) -> str:
        return (f"node {self.node_rank} of {self.nnodes}, rendezvous at {self.master_addr}:"
                f"{self.master_port or '(free port)'}")


def add_node_options(parser: argparse.ArgumentParser) -> None:
    """``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port`` (torchrun's names and meaning)."""
    group = parser.add_argument_group("several hosts (plait starts this host's ranks; or run under torchrun)")
    group.add_argument("--nnodes", type=positive_int(), default=1, help="hosts in the job (default 1)")
    group.add_argument("--node-rank", type=non_negative_int(), default=0, help="this host's index, 0..nnodes-1 (default 0)")
    group.add_argument("--master-addr", default=None,
                       help="address of node 0, where rank 0 holds the rendezvous store (needed with --nnodes > 1)")
    group.add_argument("--master-port", type=int_in(1, 65535), default=None,
                       help=f"port of the rendezvous store on node 0 (default {DEFAULT_MASTER_PORT} with --nnodes > 1)")


def node_from_args(args: argparse.Namespace) -> NodeSpec:
    """The :class:`NodeSpec` of parsed :func:`add_node_options` flags (ValueError naming the flag)."""
    nnodes, node_rank = args.nnodes, args.node_rank
    if nnodes > 1 and args.master_addr is None:
        raise ValueError(f"--nnodes {nnodes} needs --master-addr (the address of node 0, reachable from every host)")
    if "RANK" in os.environ and (nnodes > 1 or node_rank or args.master_addr or args.master_port):
        raise ValueError("--nnodes/--node-rank/--master-addr/--master-port start this host's ranks; under torchrun "
                         "(RANK is set) torchrun has started them: give those settings to torchrun instead")
    port = args.master_port if args.master_port is not None else (DEFAULT_MASTER_PORT if nnodes > 1 else None)
    return NodeSpec(nnodes, node_rank, args.master_addr or "127.0.0.1", port)


# --------------------------------------------------------------------------- the network
def source_address(remote: str) -> Optional[str]:
    """This host's IPv4 address on the route to ``remote`` (a name or address), or None if it has none."""
    try:
        target = socket.getaddrinfo(remote, DEFAULT_MASTER_PORT, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(target)             # UDP: picks the route, sends nothing
            return sock.getsockname()[0]
    except OSError:
        return None


def interface_of(address: str) -> Optional[str]:
    """The name of the network interface holding IPv4 ``address`` (Linux), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue                     # no IPv4 address on this interface
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    return None


def choose_gloo_interface(master_addr: Optional[str]) -> Optional[str]:
    """Set ``GLOO_SOCKET_IFNAME`` to the interface routing to ``master_addr`` unless it is set or the master is
    on the loopback network (one host); return the interface gloo will use (None: gloo's own choice)."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return os.environ["GLOO_SOCKET_IFNAME"]
    if not master_addr:
        return None
    address = source_address(master_addr)
    if address is None or ipaddress.ip_address(address).is_loopback:
        return None
    name = interface_of(address)
    if name is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = name
        log.info("plait: gloo uses interface %s (%s), the route to the master %s", name, address, master_addr)
    return name

"""Which network interface the collectives use across nodes.

gloo (and NCCL's bootstrap) advertise the address their host name resolves to. Where
/etc/hosts maps the host name to 127.0.0.1 or 127.0.1.1 (Debian and Ubuntu do by default;
network namespaces and many containers too), every rank advertises loopback and the ranks
on other nodes get "connection refused". When that would happen and nothing is set, pick
the interface that routes to the head node (MASTER_ADDR) for GLOO_SOCKET_IFNAME and
NCCL_SOCKET_IFNAME.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

SIOCGIFADDR = 0x8915


def _is_loopback(host: str) -> bool:
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None, socket.AF_INET)
        )
    except (socket.gaierror, ValueError):
        return False


def _ipv4_of(ifname: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_towards(addr: str) -> str | None:
    """The name of the local interface whose address is the source for packets to `addr`."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))  # UDP: nothing is sent; the kernel picks the route
            local = s.getsockname()[0]
    except OSError:
        return None
    for _, name in socket.if_nameindex():
        if _ipv4_of(name) == local:
            return name
    return None


def choose_socket_ifname(env=os.environ) -> str | None:
    """Set GLOO/NCCL_SOCKET_IFNAME when the host name resolves to loopback but the head node
    is elsewhere; returns the interface chosen (None when nothing needed setting)."""
    head = env.get("MASTER_ADDR", "")
    if not head or "GLOO_SOCKET_IFNAME" in env or _is_loopback(head):
        return None
    if not _is_loopback(socket.gethostname()):
        return None
    name = interface_towards(head)
    if name is None or name == "lo":
        return None
    env["GLOO_SOCKET_IFNAME"] = name
    env.setdefault("NCCL_SOCKET_IFNAME", name)
    return name

"""The tbf rate of an interface, asked of the kernel over rtnetlink (what `tc qdisc show`
prints), without spawning `tc`: a process per poll costs a slow gateway milliseconds of CPU.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

# <linux/rtnetlink.h>, <linux/netlink.h>, <linux/pkt_sched.h>
RTM_NEWQDISC = 36
RTM_GETQDISC = 38
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
TCA_KIND = 1
TCA_OPTIONS = 2
TCA_TBF_PARMS = 1
TCA_TBF_RATE64 = 4
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
RTATTR = struct.Struct("=HH")  # len, type
# struct tc_tbf_qopt opens with struct tc_ratespec: cell_log, linklayer, overhead,
# cell_align, mpu, then the rate in bytes/s (u32; TCA_TBF_RATE64 when it does not fit).
RATESPEC_RATE = struct.Struct("=BBHhHI")
RECV_BYTES = 65536


class QdiscError(OSError):
    """The kernel refused the dump, or its answer could not be read."""


def _attrs(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each rtattr in data[offset:], 4-byte aligned as the kernel packs."""
    while offset + RTATTR.size <= len(data):
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size:
            return
        yield kind & 0x3FFF, data[offset + RTATTR.size: offset + length]  # drop NLA flags
        offset += (length + 3) & ~3


def tbf_rate(message: bytes) -> tuple[int, float] | None:
    """(ifindex, bit/s) from one RTM_NEWQDISC payload (tcmsg + attributes) if it is a tbf."""
    if len(message) < TCMSG.size:
        return None
    ifindex = TCMSG.unpack_from(message)[1]
    attrs = dict(_attrs(message, TCMSG.size))
    if attrs.get(TCA_KIND, b"").rstrip(b"\0") != b"tbf" or TCA_OPTIONS not in attrs:
        return None
    opts = dict(_attrs(attrs[TCA_OPTIONS]))
    if TCA_TBF_RATE64 in opts and len(opts[TCA_TBF_RATE64]) >= 8:
        rate = struct.unpack_from("=Q", opts[TCA_TBF_RATE64])[0]
    elif len(opts.get(TCA_TBF_PARMS, b"")) >= RATESPEC_RATE.size:
        rate = RATESPEC_RATE.unpack_from(opts[TCA_TBF_PARMS])[5]
    else:
        return None
    return ifindex, float(rate) * 8


def messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink message in one datagram."""
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, kind, _, _, _ = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size:
            return
        yield kind, data[offset + NLMSG_HDR.size: offset + length]
        offset += (length + 3) & ~3


def read_tbf_rate(interface: str, seq: int = 1) -> float | None:
    """Bit/s of the tbf qdisc on `interface`, None if it has none; QdiscError on failure."""
    try:
        ifindex = socket.if_nametoindex(interface)
    except OSError as exc:
        raise QdiscError(f"no interface {interface!r}: {exc}") from exc
    request = TCMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    header = NLMSG_HDR.pack(NLMSG_HDR.size + len(request), RTM_GETQDISC,
                            NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    found: float | None = None
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(1.0)
        sock.send(header + request)
        while True:
            try:
                data = sock.recv(RECV_BYTES)
            except OSError as exc:
                raise QdiscError(f"qdisc dump: {exc}") from exc
            for kind, payload in messages(data):
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    code = struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if code:
                        raise QdiscError(f"qdisc dump refused: errno {-code}")
                    continue
                if kind == RTM_NEWQDISC:
                    tbf = tbf_rate(payload)
                    if tbf is not None and tbf[0] == ifindex:
                        found = tbf[1]
            if not data:
                return found

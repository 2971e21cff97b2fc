"""The rtnetlink messages that set up and drive output buffering, as pure data.

Every builder returns a ``netlink.Request`` and every parser takes a
payload; none of them sends anything.  The layouts are the kernel's uapi
structs, named in a comment beside each ``struct.Struct`` and packed in host
byte order with an explicit ``=``; constants are spelled as in the header
that defines them.

What gets built, for one guest interface ("vif") and its IFB:

* the IFB: ``RTM_NEWLINK`` kind ``ifb``, created up;
* on the IFB's root, a ``plug`` qdisc (handle ``1:``) whose ``TCA_OPTIONS``
  is ``struct tc_plug_qopt``; the same message without ``NLM_F_CREATE``
  sends the plug its actions (``PlugAction``);
* on the vif, the ``ingress`` qdisc (``ffff:``) and one ``u32`` filter with
  protocol ``ETH_P_ALL`` and no keys (so it matches every frame of every
  ethertype and length) whose action is ``mirred`` egress redirect to the IFB;
* the ``RTM_DEL*`` messages that undo each, and ``RTM_GET*`` to look links
  and qdiscs up.

The vif's ingress is the guest's transmit path: a frame the guest sends
arrives at the vif, is redirected to the IFB, waits in the plug, and after
the IFB re-enters the host's stack on the vif as if it had just arrived.
"""

from __future__ import annotations

import socket
import struct
from enum import IntEnum
from typing import NamedTuple, Optional

from remus.netbuf.netlink import (
    NLM_F_CREATE,
    NLM_F_ECHO,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    Request,
    asciiz,
    attr_map,
    nested,
    rtattr,
    rtattr_str,
)

# include/uapi/linux/rtnetlink.h
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWQDISC = 36
RTM_DELQDISC = 37
RTM_GETQDISC = 38
RTM_NEWTFILTER = 44
RTM_DELTFILTER = 45
TCA_KIND = 1
TCA_OPTIONS = 2
TCA_STATS2 = 7
AF_UNSPEC = 0
#: struct ifinfomsg { unsigned char ifi_family; unsigned char __ifi_pad; unsigned short ifi_type;
#:                    int ifi_index; unsigned ifi_flags; unsigned ifi_change; }
IFINFOMSG = struct.Struct("=BxHiII")
#: struct tcmsg { unsigned char tcm_family; unsigned char tcm__pad1; unsigned short tcm__pad2;
#:                int tcm_ifindex; __u32 tcm_handle; __u32 tcm_parent; __u32 tcm_info; }
TCMSG = struct.Struct("=BxxxiIII")

# include/uapi/linux/if_link.h
IFLA_IFNAME = 3
IFLA_LINKINFO = 18
IFLA_STATS64 = 23
IFLA_INFO_KIND = 1
#: struct rtnl_link_stats64 { __u64 rx_packets; __u64 tx_packets; __u64 rx_bytes; __u64 tx_bytes;
#:     __u64 rx_errors; __u64 tx_errors; __u64 rx_dropped; __u64 tx_dropped; ... }  (the first 8 of 24+)
RTNL_LINK_STATS64_HEAD = struct.Struct("=8Q")
# include/uapi/linux/if.h
IFF_UP = 0x1
IFNAMSIZ = 16
# include/uapi/linux/if_ether.h
ETH_P_ALL = 0x0003

# include/uapi/linux/pkt_sched.h
TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1
#: struct tc_plug_qopt { int action; __u32 limit; }  (the "PLUG section"; limit in bytes)
TC_PLUG_QOPT = struct.Struct("=iI")

# include/uapi/linux/pkt_cls.h
TCA_ACT_KIND = 1
TCA_ACT_OPTIONS = 2
TC_ACT_STOLEN = 4
TCA_U32_SEL = 5
TCA_U32_ACT = 7
TC_U32_TERMINAL = 1
#: struct tc_u32_sel { unsigned char flags, offshift, nkeys; __be16 offmask; __u16 off; short offoff;
#:                     short hoff; __be32 hmask; struct tc_u32_key keys[]; }  (16 bytes, no keys here)
TC_U32_SEL = struct.Struct("=BBBxHHhhI")

# include/uapi/linux/tc_act/tc_mirred.h
TCA_EGRESS_REDIR = 1
TCA_MIRRED_PARMS = 2
#: struct tc_mirred { tc_gen (__u32 index; __u32 capab; int action; int refcnt; int bindcnt);
#:                    int eaction; __u32 ifindex; }
TC_MIRRED = struct.Struct("=IIiiiiI")

# include/uapi/linux/gen_stats.h
TCA_STATS_QUEUE = 3
#: struct gnet_stats_queue { __u32 qlen; __u32 backlog; __u32 drops; __u32 requeues; __u32 overlimits; }
GNET_STATS_QUEUE = struct.Struct("=IIIII")

#: The plug's handle on the IFB's root ("1:"); the IFB is ours, so nothing else is there.
PLUG_HANDLE = 0x00010000
#: The ingress qdisc's handle ("ffff:"), as tc gives it.
INGRESS_HANDLE = 0xFFFF0000
#: Priority ("pref") of the redirect filter on the vif's ingress.
REDIRECT_PREF = 10
#: The filter's first action slot (TCA_ACT_* attributes are numbered from 1 in order).
FIRST_ACTION = 1


class PlugAction(IntEnum):
    """What a ``plug`` qdisc is told to do (``TCQ_PLUG_*``, include/uapi/linux/pkt_sched.h)."""

    #: TCQ_PLUG_BUFFER: close the current epoch; later packets are held behind it.
    BUFFER = 0
    #: TCQ_PLUG_RELEASE_ONE: let the oldest closed epoch out.
    RELEASE_ONE = 1
    #: TCQ_PLUG_RELEASE_INDEFINITE: let everything out and pass packets until the next BUFFER.
    RELEASE_INDEFINITE = 2
    #: TCQ_PLUG_LIMIT: set the queue's limit in bytes.
    LIMIT = 3


# ------------------------------------------------------------------------------ building


def ifinfomsg(ifi_index: int = 0, ifi_flags: int = 0, ifi_change: int = 0) -> bytes:
    return IFINFOMSG.pack(AF_UNSPEC, 0, ifi_index, ifi_flags, ifi_change)


def tcmsg(tcm_ifindex: int, tcm_handle: int, tcm_parent: int, tcm_info: int = 0) -> bytes:
    return TCMSG.pack(AF_UNSPEC, tcm_ifindex, tcm_handle, tcm_parent, tcm_info)


def _ifname(name: str) -> bytes:
    if not 0 < len(name) < IFNAMSIZ or "/" in name or name.strip() != name:
        raise ValueError(f"{name!r} is not a valid interface name (1-{IFNAMSIZ - 1} characters)")
    return rtattr_str(IFLA_IFNAME, name)


def get_link(name: str) -> Request:
    """RTM_GETLINK for the interface called ``name`` (answered by one RTM_NEWLINK)."""
    return Request(RTM_GETLINK, NLM_F_REQUEST, ifinfomsg() + _ifname(name))


def new_ifb(name: str) -> Request:
    """RTM_NEWLINK creating IFB device ``name``, already up (fails if the name is taken)."""
    return Request(
        RTM_NEWLINK,
        NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL,
        ifinfomsg(ifi_flags=IFF_UP, ifi_change=IFF_UP)
        + _ifname(name)
        + nested(IFLA_LINKINFO, rtattr_str(IFLA_INFO_KIND, "ifb")),
    )


def del_link(ifindex: int) -> Request:
    """RTM_DELLINK of the interface with index ``ifindex``."""
    return Request(RTM_DELLINK, NLM_F_REQUEST, ifinfomsg(ifi_index=ifindex))


def plug_options(action: PlugAction, limit_bytes: int = 0) -> bytes:
    """``TCA_OPTIONS`` of a plug: ``struct tc_plug_qopt``.

    ``action`` must be a ``PlugAction``: a bare or unknown integer is refused
    here rather than silently sent as TCQ_PLUG_BUFFER.
    """
    if not isinstance(action, PlugAction):
        raise TypeError(f"plug action must be a PlugAction, not {action!r}")
    if not 0 <= limit_bytes <= 0xFFFFFFFF:
        raise ValueError(f"plug limit {limit_bytes} bytes does not fit a __u32")
    return rtattr(TCA_OPTIONS, TC_PLUG_QOPT.pack(int(action), limit_bytes))


def new_plug(ifb_index: int, limit_bytes: int) -> Request:
    """RTM_NEWQDISC creating the plug on the IFB's root with its byte limit.

    The kernel takes only ``limit`` from the options at creation (and leaves
    the new plug throttled); the action sent is TCQ_PLUG_LIMIT to say so.
    """
    return Request(
        RTM_NEWQDISC,
        NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL,
        tcmsg(ifb_index, PLUG_HANDLE, TC_H_ROOT)
        + rtattr_str(TCA_KIND, "plug")
        + plug_options(PlugAction.LIMIT, limit_bytes),
    )


def plug(ifb_index: int, action: PlugAction, limit_bytes: int = 0) -> Request:
    """RTM_NEWQDISC (change) sending ``action`` to the plug on the IFB's root.

    ``TCA_KIND`` makes the kernel refuse (EINVAL) if the root qdisc is not a plug.
    """
    return Request(
        RTM_NEWQDISC,
        NLM_F_REQUEST,
        tcmsg(ifb_index, PLUG_HANDLE, TC_H_ROOT)
        + rtattr_str(TCA_KIND, "plug")
        + plug_options(action, limit_bytes),
    )


def del_plug(ifb_index: int) -> Request:
    """RTM_DELQDISC of the plug on the IFB's root."""
    return Request(RTM_DELQDISC, NLM_F_REQUEST, tcmsg(ifb_index, PLUG_HANDLE, TC_H_ROOT) + rtattr_str(TCA_KIND, "plug"))


def get_root_qdisc(ifindex: int) -> Request:
    """RTM_GETQDISC of the root qdisc of ``ifindex``, answered by one RTM_NEWQDISC with stats.

    NLM_F_ECHO is needed: without it the kernel sends the answer only to the
    RTNLGRP_TC multicast group (``qdisc_notify``), not to the asker.
    """
    return Request(RTM_GETQDISC, NLM_F_REQUEST | NLM_F_ECHO, tcmsg(ifindex, 0, TC_H_ROOT))


def new_ingress(vif_index: int) -> Request:
    """RTM_NEWQDISC adding the ingress qdisc to the vif (fails if it has one)."""
    return Request(
        RTM_NEWQDISC,
        NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL,
        tcmsg(vif_index, INGRESS_HANDLE, TC_H_INGRESS) + rtattr_str(TCA_KIND, "ingress"),
    )


def del_ingress(vif_index: int) -> Request:
    """RTM_DELQDISC of the vif's ingress qdisc (and with it every filter on it)."""
    return Request(
        RTM_DELQDISC, NLM_F_REQUEST, tcmsg(vif_index, INGRESS_HANDLE, TC_H_INGRESS) + rtattr_str(TCA_KIND, "ingress")
    )


def redirect_info() -> int:
    """``tcm_info`` of the redirect filter: TC_H_MAKE(pref << 16, htons(ETH_P_ALL))."""
    return (REDIRECT_PREF << 16) | socket.htons(ETH_P_ALL)


def new_redirect(vif_index: int, ifb_index: int) -> Request:
    """RTM_NEWTFILTER: every frame arriving on the vif goes to the IFB's egress.

    A ``u32`` selector with no keys and TC_U32_TERMINAL matches without
    reading the packet, so even frames too short for a key are caught; the
    action is ``mirred`` with TCA_EGRESS_REDIR and TC_ACT_STOLEN (the frame
    continues only through the IFB).
    """
    selector = TC_U32_SEL.pack(TC_U32_TERMINAL, 0, 0, 0, 0, 0, 0, 0)
    mirred = TC_MIRRED.pack(0, 0, TC_ACT_STOLEN, 0, 0, TCA_EGRESS_REDIR, ifb_index)
    action = nested(
        FIRST_ACTION,
        rtattr_str(TCA_ACT_KIND, "mirred"),
        nested(TCA_ACT_OPTIONS, rtattr(TCA_MIRRED_PARMS, mirred)),
    )
    return Request(
        RTM_NEWTFILTER,
        NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL,
        tcmsg(vif_index, 0, INGRESS_HANDLE, redirect_info())
        + rtattr_str(TCA_KIND, "u32")
        + nested(TCA_OPTIONS, rtattr(TCA_U32_SEL, selector), nested(TCA_U32_ACT, action)),
    )


def del_redirect(vif_index: int) -> Request:
    """RTM_DELTFILTER removing the redirect filter (its whole pref/protocol) from the vif."""
    return Request(
        RTM_DELTFILTER, NLM_F_REQUEST, tcmsg(vif_index, 0, INGRESS_HANDLE, redirect_info()) + rtattr_str(TCA_KIND, "u32")
    )


# ------------------------------------------------------------------------------ parsing


class LinkStats(NamedTuple):
    """The packet counters of IFLA_STATS64 that tell whether an IFB still holds frames."""

    rx_packets: int
    tx_packets: int
    rx_dropped: int
    tx_dropped: int


class Link(NamedTuple):
    """What an RTM_NEWLINK answer says about an interface (``stats`` None without IFLA_STATS64)."""

    ifindex: int
    name: str
    kind: Optional[str]
    flags: int
    stats: Optional[LinkStats] = None


class Qdisc(NamedTuple):
    """What an RTM_NEWQDISC answer says about a qdisc (``qlen`` None without stats)."""

    ifindex: int
    handle: int
    parent: int
    kind: str
    qlen: Optional[int]


def parse_link(payload: bytes) -> Link:
    """Read ``struct ifinfomsg`` and its IFLA_IFNAME / IFLA_LINKINFO / IFLA_STATS64 attributes."""
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(payload)
    attrs = attr_map(payload[IFINFOMSG.size :])
    kind = None
    if IFLA_LINKINFO in attrs:
        info = attr_map(attrs[IFLA_LINKINFO])
        if IFLA_INFO_KIND in info:
            kind = asciiz(info[IFLA_INFO_KIND])
    stats = None
    if len(attrs.get(IFLA_STATS64, b"")) >= RTNL_LINK_STATS64_HEAD.size:
        counters = RTNL_LINK_STATS64_HEAD.unpack_from(attrs[IFLA_STATS64])
        stats = LinkStats(counters[0], counters[1], counters[6], counters[7])
    return Link(index, asciiz(attrs.get(IFLA_IFNAME, b"")), kind, flags, stats)


def parse_qdisc(payload: bytes) -> Qdisc:
    """Read ``struct tcmsg``, TCA_KIND and the queue length from TCA_STATS2."""
    _family, ifindex, handle, parent, _info = TCMSG.unpack_from(payload)
    attrs = attr_map(payload[TCMSG.size :])
    qlen = None
    if TCA_STATS2 in attrs:
        stats = attr_map(attrs[TCA_STATS2])
        if TCA_STATS_QUEUE in stats and len(stats[TCA_STATS_QUEUE]) >= GNET_STATS_QUEUE.size:
            qlen = GNET_STATS_QUEUE.unpack_from(stats[TCA_STATS_QUEUE])[0]
    return Qdisc(ifindex, handle, parent, asciiz(attrs.get(TCA_KIND, b"")), qlen)

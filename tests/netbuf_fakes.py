"""A fake kernel for network-buffering tests: it parses remus's rtnetlink requests and answers them.

``FakeKernel`` is a ``RawSocket``: hand it to ``RtnlSocket`` and the real
``PlugBuffer`` runs against it.  It keeps links, qdiscs and the redirect
filter as a kernel would (with the kernel's errnos and extended-ACK texts for
the cases remus meets), and models each plug with ``remus.sim.output``'s
``PlugQueue``, so ``inject`` of a packet on a vif behaves like a frame the
guest sends: redirected into the IFB's plug when the filter exists, straight
out otherwise.  Every request is logged in ``requests`` by name.
"""

from __future__ import annotations

import errno
import struct
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple

from remus.netbuf import netlink, tc
from remus.netbuf.netlink import NLM_F_CREATE, NLMSG_ERROR, attr_map
from remus.netbuf.tc import PlugAction
from remus.sim.output import PlugQueue

MESSAGE_NAMES = netlink.MESSAGE_NAMES


class KernelError(Exception):
    def __init__(self, code: int, msg: str = "") -> None:
        super().__init__(code, msg)
        self.code = code
        self.msg = msg


class FakeKernel:
    """See the module docstring.  ``deliver(packets)`` receives whatever leaves a vif's path."""

    def __init__(
        self,
        links: Tuple[str, ...] = ("vif1.0",),
        *,
        has_plug: bool = True,
        has_ifb: bool = True,
        deliver: Optional[Callable[[List[int]], None]] = None,
        log: Optional[List[object]] = None,
    ) -> None:
        self.links: Dict[str, Tuple[int, Optional[str]]] = {}
        self._next_index = 5
        for name in links:
            self.add_link(name)
        self.has_plug = has_plug
        self.has_ifb = has_ifb
        self.delivered: List[int] = []
        self.deliver = deliver or self.delivered.extend
        self.log = log if log is not None else []
        self.requests: List[str] = []
        self.frames: List[bytes] = []
        self.qdiscs: Dict[Tuple[int, int], str] = {}  # (ifindex, parent) -> kind
        self.plugs: Dict[int, PlugQueue] = {}  # IFB ifindex -> its plug
        self.limits: Dict[int, int] = {}
        self.redirects: Dict[int, int] = {}  # vif ifindex -> IFB ifindex
        self.fail: Dict[str, KernelError] = {}  # request name -> error to answer once
        self.ifb_backlog: List[int] = []  # frames an IFB still holds, one entry per RTM_GETLINK of it
        self.closed = False
        self._inbox: Deque[bytes] = deque()

    # -- the world outside netlink ---------------------------------------------------
    def add_link(self, name: str, kind: Optional[str] = None) -> int:
        index = self._next_index
        self._next_index += 1
        self.links[name] = (index, kind)
        return index

    def index(self, name: str) -> int:
        return self.links[name][0]

    def name_of(self, index: int) -> Optional[str]:
        for name, (i, _k) in self.links.items():
            if i == index:
                return name
        return None

    def inject(self, vif: str, packets: List[int]) -> None:
        """Frames the guest sends out of ``vif``."""
        ifb = self.redirects.get(self.index(vif))
        if ifb is not None and ifb in self.plugs:
            self.plugs[ifb].enqueue(packets)
        else:
            self.deliver(packets)

    # -- RawSocket ------------------------------------------------------------------------
    def send(self, data: bytes) -> int:
        self.frames.append(bytes(data))
        for hdr, payload in netlink.split_messages(data):
            name = MESSAGE_NAMES[hdr.nlmsg_type]
            self.requests.append(name)
            answers: List[bytes] = []
            try:
                injected = self.fail.pop(name, None)
                if injected is not None:
                    raise injected
                answers = self._handle(name, hdr.nlmsg_flags, payload)
                code, msg = 0, ""
            except KernelError as exc:
                code, msg = exc.code, exc.msg
            for answer_type, answer in answers:
                self._inbox.append(netlink.nlmsg(answer_type, 0, hdr.nlmsg_seq, answer))
            self._inbox.append(self._ack(hdr, data, code, msg))
        return len(data)

    def recv(self, bufsize: int) -> bytes:
        return self._inbox.popleft()

    def close(self) -> None:
        self.closed = True

    @staticmethod
    def _ack(hdr: netlink.NlMsgHdr, data: bytes, code: int, msg: str) -> bytes:
        tlvs = netlink.rtattr_str(netlink.NLMSGERR_ATTR_MSG, msg) if msg else b""
        flags = netlink.NLM_F_CAPPED | (netlink.NLM_F_ACK_TLVS if tlvs else 0)
        payload = struct.pack("=i", -code) + data[:16] + tlvs
        return netlink.nlmsg(NLMSG_ERROR, flags, hdr.nlmsg_seq, payload)

    # -- the kernel's side ------------------------------------------------------------------
    def _handle(self, name: str, flags: int, payload: bytes) -> List[Tuple[int, bytes]]:
        if name in ("RTM_GETLINK", "RTM_NEWLINK", "RTM_DELLINK"):
            return self._link(name, flags, payload)
        if name in ("RTM_NEWQDISC", "RTM_DELQDISC", "RTM_GETQDISC"):
            return self._qdisc(name, flags, payload)
        return self._filter(name, payload)

    def _link(self, name: str, flags: int, payload: bytes) -> List[Tuple[int, bytes]]:
        _f, _t, index, ifi_flags, _c = tc.IFINFOMSG.unpack_from(payload)
        attrs = attr_map(payload[tc.IFINFOMSG.size :])
        ifname = netlink.asciiz(attrs[tc.IFLA_IFNAME]) if tc.IFLA_IFNAME in attrs else None
        if name == "RTM_GETLINK":
            if ifname not in self.links:
                raise KernelError(errno.ENODEV)
            idx, kind = self.links[ifname]
            info = netlink.nested(tc.IFLA_LINKINFO, netlink.rtattr_str(tc.IFLA_INFO_KIND, kind)) if kind else b""
            backlog = self.ifb_backlog.pop(0) if kind == "ifb" and self.ifb_backlog else 0
            stats = netlink.rtattr(tc.IFLA_STATS64, struct.pack("=24Q", 10 + backlog, 10, *[0] * 22))
            return [(tc.RTM_NEWLINK, tc.ifinfomsg(idx, 0x1) + netlink.rtattr_str(tc.IFLA_IFNAME, ifname) + info + stats)]
        if name == "RTM_NEWLINK":
            assert flags & NLM_F_CREATE and ifname is not None and ifi_flags & tc.IFF_UP
            kind = netlink.asciiz(attr_map(attrs[tc.IFLA_LINKINFO])[tc.IFLA_INFO_KIND])
            if kind == "ifb" and not self.has_ifb:
                raise KernelError(errno.EOPNOTSUPP, "Unknown device type")
            if ifname in self.links:
                raise KernelError(errno.EEXIST)
            self.add_link(ifname, kind)
            self.log.append(("link", "new", ifname))
            return []
        gone = self.name_of(index)
        if gone is None:
            raise KernelError(errno.ENODEV)
        del self.links[gone]
        self.plugs.pop(index, None)
        self.qdiscs = {k: v for k, v in self.qdiscs.items() if k[0] != index}
        self.log.append(("link", "del", gone))
        return []

    def _qdisc(self, name: str, flags: int, payload: bytes) -> List[Tuple[int, bytes]]:
        _f, ifindex, handle, parent, _i = tc.TCMSG.unpack_from(payload)
        attrs = attr_map(payload[tc.TCMSG.size :])
        kind = netlink.asciiz(attrs[tc.TCA_KIND]) if tc.TCA_KIND in attrs else None
        if self.name_of(ifindex) is None:
            raise KernelError(errno.ENODEV)
        key = (ifindex, parent)
        if name == "RTM_GETQDISC":
            queue = self.plugs.get(ifindex)
            stats = netlink.nested(
                tc.TCA_STATS2,
                netlink.rtattr(tc.TCA_STATS_QUEUE, tc.GNET_STATS_QUEUE.pack(queue.held if queue else 0, 0, 0, 0, 0)),
            )
            qkind = self.qdiscs.get(key, "noqueue")
            return [(tc.RTM_NEWQDISC, tc.tcmsg(ifindex, handle, parent) + netlink.rtattr_str(tc.TCA_KIND, qkind) + stats)]
        if name == "RTM_DELQDISC":
            if self.qdiscs.get(key) != kind:
                raise KernelError(errno.EINVAL, "Invalid handle")
            del self.qdiscs[key]
            if kind == "plug":
                del self.plugs[ifindex]
            if kind == "ingress":
                self.redirects.pop(ifindex, None)
            self.log.append(("qdisc", "del", kind))
            return []
        if flags & NLM_F_CREATE:
            if kind == "plug" and not self.has_plug:
                raise KernelError(errno.ENOENT, "Specified qdisc kind is unknown")
            if key in self.qdiscs:
                raise KernelError(errno.EEXIST, "Exclusivity flag on, cannot modify")
            self.qdiscs[key] = kind or ""
            if kind == "plug":
                _action, limit = tc.TC_PLUG_QOPT.unpack(attrs[tc.TCA_OPTIONS])
                self.plugs[ifindex] = PlugQueue(lambda pkts: self.deliver(list(pkts)))
                self.limits[ifindex] = limit
            self.log.append(("qdisc", "new", kind))
            return []
        if self.qdiscs.get(key) != kind:
            raise KernelError(errno.EINVAL, "Invalid qdisc name")
        action, limit = tc.TC_PLUG_QOPT.unpack(attrs[tc.TCA_OPTIONS])
        queue = self.plugs[ifindex]
        act = PlugAction(action)
        self.log.append(("plug", act.name))   # before the packets it lets out
        {
            PlugAction.BUFFER: queue.plug,
            PlugAction.RELEASE_ONE: queue.release_one,
            PlugAction.RELEASE_INDEFINITE: queue.release_all,
            PlugAction.LIMIT: lambda: self.limits.__setitem__(ifindex, limit),
        }[act]()
        return []

    def _filter(self, name: str, payload: bytes) -> List[Tuple[int, bytes]]:
        _f, ifindex, _handle, parent, info = tc.TCMSG.unpack_from(payload)
        if self.name_of(ifindex) is None:
            raise KernelError(errno.ENODEV)
        if self.qdiscs.get((ifindex, tc.TC_H_INGRESS)) != "ingress" or parent != tc.INGRESS_HANDLE:
            raise KernelError(errno.EINVAL, "Parent Qdisc doesn't exists")
        assert info == tc.redirect_info()
        if name == "RTM_DELTFILTER":
            if ifindex not in self.redirects:
                raise KernelError(errno.ENOENT, "Filter with specified priority/protocol not found")
            del self.redirects[ifindex]
            self.log.append(("filter", "del"))
            return []
        options = attr_map(attr_map(payload[tc.TCMSG.size :])[tc.TCA_OPTIONS])
        action = attr_map(attr_map(options[tc.TCA_U32_ACT])[tc.FIRST_ACTION])
        parms = attr_map(action[tc.TCA_ACT_OPTIONS])[tc.TCA_MIRRED_PARMS]
        target = tc.TC_MIRRED.unpack(parms)[-1]
        self.redirects[ifindex] = target
        self.log.append(("filter", "new"))
        return []

    # -- what tests look at ---------------------------------------------------------------
    def leftovers(self) -> Set[str]:
        """Anything remus made that still exists."""
        found = {f"link {n}" for n, (_i, kind) in self.links.items() if kind == "ifb"}
        found |= {f"qdisc {k} on {self.name_of(i)}" for (i, _p), k in self.qdiscs.items()}
        found |= {f"redirect on {self.name_of(i)}" for i in self.redirects}
        return found

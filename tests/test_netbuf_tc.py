"""The exact bytes of every rtnetlink message remus sends, against hand-derived golden values.

Each golden is derived field by field from the kernel's uapi layouts
(include/uapi/linux/netlink.h, rtnetlink.h, if_link.h, pkt_sched.h,
pkt_cls.h, tc_act/tc_mirred.h) in the comment above it.  Host byte order is
little-endian here (x86); the goldens are skipped elsewhere.  Every message
is framed with seq 1 and pid 0; NLM_F_ACK (0x04) is always added.

Common pieces:
  nlmsghdr   = len u32 | type u16 | flags u16 | seq u32 (01000000) | pid u32 (00000000)
  tcmsg      = family u8 00 | pad 000000 | ifindex i32 | handle u32 | parent u32 | info u32
  ifinfomsg  = family u8 00 | pad 00 | type u16 0000 | index i32 | flags u32 | change u32
  rtattr     = len u16 (header + payload, not padding) | type u16, payload padded to 4
"""

import sys

import pytest

from remus.netbuf import tc
from remus.netbuf.tc import PlugAction

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="goldens are in little-endian host order")

VIF = 5  # the vif's ifindex
IFB = 7  # the IFB's ifindex


def golden(text: str) -> bytes:
    """Hex with spaces, newlines and '#' comments allowed."""
    return bytes.fromhex("".join(line.split("#", 1)[0] for line in text.splitlines()))


PLUG_TCMSG = """
    00 000000    # tcm_family AF_UNSPEC, padding
    07000000     # tcm_ifindex 7 (the IFB)
    00000100     # tcm_handle 0x00010000 ("1:")
    ffffffff     # tcm_parent TC_H_ROOT
    00000000     # tcm_info 0
    09000100 706c756700 000000   # TCA_KIND (1), len 4+5: "plug\\0", 3 bytes padding
"""


@pytest.mark.parametrize(
    "action, action_hex",
    [
        pytest.param(PlugAction.BUFFER, "00000000", id="TCQ_PLUG_BUFFER"),
        pytest.param(PlugAction.RELEASE_ONE, "01000000", id="TCQ_PLUG_RELEASE_ONE"),
        pytest.param(PlugAction.RELEASE_INDEFINITE, "02000000", id="TCQ_PLUG_RELEASE_INDEFINITE"),
    ],
)
def test_plug_action_bytes(action: PlugAction, action_hex: str) -> None:
    expected = golden(
        """
        3c000000     # nlmsg_len 60 = 16 header + 20 tcmsg + 12 TCA_KIND + 12 TCA_OPTIONS
        2400         # RTM_NEWQDISC (36): a change, no NLM_F_CREATE
        0500         # NLM_F_REQUEST | NLM_F_ACK
        01000000 00000000   # seq 1, pid 0
        """
        + PLUG_TCMSG
        + """
        0c000200     # TCA_OPTIONS (2), len 4+8: struct tc_plug_qopt
        """
        + action_hex
        + """        # int action
        00000000     # __u32 limit (ignored by these actions)
        """
    )
    assert tc.plug(IFB, action).frame(seq=1) == expected


def test_plug_limit_change_bytes() -> None:
    expected = golden(
        """
        3c000000 2400 0500 01000000 00000000   # 60 bytes, RTM_NEWQDISC, REQUEST|ACK
        """
        + PLUG_TCMSG
        + """
        0c000200     # TCA_OPTIONS, len 12
        03000000     # action TCQ_PLUG_LIMIT (3)
        80f0fa02     # limit 50_000_000 bytes = 0x02faf080
        """
    )
    assert tc.plug(IFB, PlugAction.LIMIT, 50_000_000).frame(seq=1) == expected


def test_new_plug_bytes() -> None:
    expected = golden(
        """
        3c000000     # nlmsg_len 60
        2400         # RTM_NEWQDISC (36)
        0506         # NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL (0x200) | NLM_F_CREATE (0x400) = 0x605
        01000000 00000000
        """
        + PLUG_TCMSG
        + """
        0c000200     # TCA_OPTIONS, len 12
        03000000     # TCQ_PLUG_LIMIT: at creation the kernel reads only the limit
        80f0fa02     # limit 50_000_000 bytes
        """
    )
    assert tc.new_plug(IFB, 50_000_000).frame(seq=1) == expected


def test_del_plug_bytes() -> None:
    expected = golden(
        """
        30000000     # nlmsg_len 48 = 16 + 20 + 12
        2500         # RTM_DELQDISC (37)
        0500 01000000 00000000
        """
        + PLUG_TCMSG
    )
    assert tc.del_plug(IFB).frame(seq=1) == expected


def test_get_root_qdisc_bytes() -> None:
    expected = golden(
        """
        24000000     # nlmsg_len 36 = 16 + 20
        2600         # RTM_GETQDISC (38)
        0d00         # NLM_F_REQUEST | NLM_F_ACK | NLM_F_ECHO (0x08): the answer comes back to us
        01000000 00000000
        00 000000 07000000   # AF_UNSPEC, ifindex 7
        00000000     # tcm_handle 0
        ffffffff     # tcm_parent TC_H_ROOT
        00000000
        """
    )
    assert tc.get_root_qdisc(IFB).frame(seq=1) == expected


def test_new_ifb_bytes() -> None:
    expected = golden(
        """
        38000000     # nlmsg_len 56 = 16 + 16 ifinfomsg + 12 IFLA_IFNAME + 12 IFLA_LINKINFO
        1000         # RTM_NEWLINK (16)
        0506         # REQUEST | ACK | EXCL | CREATE
        01000000 00000000
        00 00 0000   # ifi_family AF_UNSPEC, __ifi_pad, ifi_type 0
        00000000     # ifi_index 0: a new link
        01000000     # ifi_flags IFF_UP
        01000000     # ifi_change IFF_UP: created up
        0b000300 72656d75733500 00   # IFLA_IFNAME (3), len 4+7: "remus5\\0", 1 byte padding
        0c001200     # IFLA_LINKINFO (18), len 4+8, nested:
        08000100 69666200            #   IFLA_INFO_KIND (1), len 4+4: "ifb\\0"
        """
    )
    assert tc.new_ifb("remus5").frame(seq=1) == expected


def test_get_link_bytes() -> None:
    expected = golden(
        """
        2c000000     # nlmsg_len 44 = 16 + 16 + 12
        1200         # RTM_GETLINK (18)
        0500 01000000 00000000
        00 00 0000 00000000 00000000 00000000   # ifinfomsg, all zero: look up by name
        0b000300 766966312e3000 00           # IFLA_IFNAME, len 11: "vif1.0\\0", 1 byte padding
        """
    )
    assert tc.get_link("vif1.0").frame(seq=1) == expected


def test_del_link_bytes() -> None:
    expected = golden(
        """
        20000000     # nlmsg_len 32 = 16 + 16
        1100         # RTM_DELLINK (17)
        0500 01000000 00000000
        00 00 0000   # family, pad, type
        07000000     # ifi_index 7 (the IFB)
        00000000 00000000   # ifi_flags, ifi_change
        """
    )
    assert tc.del_link(IFB).frame(seq=1) == expected


INGRESS_TCMSG = """
    00 000000    # AF_UNSPEC, padding
    05000000     # tcm_ifindex 5 (the vif)
    0000ffff     # tcm_handle 0xffff0000 ("ffff:")
    f1ffffff     # tcm_parent TC_H_INGRESS 0xfffffff1
    00000000     # tcm_info
    0c000100 696e677265737300   # TCA_KIND, len 4+8: "ingress\\0"
"""


def test_new_ingress_bytes() -> None:
    expected = golden(
        """
        30000000     # nlmsg_len 48 = 16 + 20 + 12
        2400 0506    # RTM_NEWQDISC, REQUEST | ACK | EXCL | CREATE
        01000000 00000000
        """
        + INGRESS_TCMSG
    )
    assert tc.new_ingress(VIF).frame(seq=1) == expected


def test_del_ingress_bytes() -> None:
    expected = golden(
        """
        30000000 2500 0500 01000000 00000000   # 48 bytes, RTM_DELQDISC (37), REQUEST | ACK
        """
        + INGRESS_TCMSG
    )
    assert tc.del_ingress(VIF).frame(seq=1) == expected


FILTER_TCMSG = """
    00 000000    # AF_UNSPEC, padding
    05000000     # tcm_ifindex 5 (the vif)
    00000000     # tcm_handle 0: the kernel numbers the u32 node
    0000ffff     # tcm_parent 0xffff0000: the ingress qdisc
    00030a00     # tcm_info 0x000a0300 = pref 10 << 16 | htons(ETH_P_ALL 0x0003) = 0x0300
    08000100 75333200            # TCA_KIND, len 8: "u32\\0"
"""


def test_new_redirect_bytes() -> None:
    expected = golden(
        """
        7c000000     # nlmsg_len 124 = 16 + 20 tcmsg + 8 TCA_KIND + 80 TCA_OPTIONS
        2c00         # RTM_NEWTFILTER (44)
        0506         # REQUEST | ACK | EXCL | CREATE
        01000000 00000000
        """
        + FILTER_TCMSG
        + """
        50000200     # TCA_OPTIONS (2), len 4+76, nested:
        14000500     #   TCA_U32_SEL (5), len 4+16: struct tc_u32_sel with no keys
        01           #     flags TC_U32_TERMINAL
        00           #     offshift
        00           #     nkeys 0: matches every frame without reading it
        00           #     (padding before the __be16)
        0000 0000    #     offmask, off
        0000 0000    #     offoff, hoff
        00000000     #     hmask
        38000700     #   TCA_U32_ACT (7), len 4+52, nested:
        34000100     #     action 1 (the first of the list), len 4+48, nested:
        0b000100 6d697272656400 00   #       TCA_ACT_KIND (1), len 4+7: "mirred\\0", 1 byte padding
        24000200     #       TCA_ACT_OPTIONS (2), len 4+32, nested:
        20000200     #         TCA_MIRRED_PARMS (2), len 4+28: struct tc_mirred
        00000000     #           index 0 (a new action)
        00000000     #           capab
        04000000     #           action TC_ACT_STOLEN (4)
        00000000     #           refcnt
        00000000     #           bindcnt
        01000000     #           eaction TCA_EGRESS_REDIR (1)
        07000000     #           ifindex 7 (the IFB)
        """
    )
    assert tc.new_redirect(VIF, IFB).frame(seq=1) == expected


def test_del_redirect_bytes() -> None:
    expected = golden(
        """
        2c000000     # nlmsg_len 44 = 16 + 20 + 8
        2d00         # RTM_DELTFILTER (45)
        0500 01000000 00000000
        """
        + FILTER_TCMSG
    )
    assert tc.del_redirect(VIF).frame(seq=1) == expected


def test_plug_action_must_be_a_plug_action() -> None:
    # pyroute2's sched_plug turned an unknown action into 0 (TCQ_PLUG_BUFFER); here it is refused.
    with pytest.raises(TypeError):
        tc.plug_options(1, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PlugAction(4)
    with pytest.raises(ValueError):
        tc.plug_options(PlugAction.LIMIT, 1 << 32)


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", " vif1.0"])
def test_bad_interface_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        tc.get_link(name)


def test_parse_link_answer() -> None:
    answer = golden(
        """
        00 00 0100   # family, pad, ifi_type ARPHRD_ETHER (1)
        07000000     # ifi_index 7
        43000100     # ifi_flags UP|BROADCAST|RUNNING|LOWER_UP (0x10043)
        00000000
        0b000300 72656d75733500 00   # IFLA_IFNAME "remus5"
        04000400                     # IFLA_MTU with an empty payload (ignored)
        10001200     # IFLA_LINKINFO, len 16:
        08000100 69666200            #   IFLA_INFO_KIND "ifb"
        04000200                     #   IFLA_INFO_DATA, empty
        """
    )
    assert tc.parse_link(answer) == tc.Link(7, "remus5", "ifb", 0x10043, None)


def test_parse_link_stats() -> None:
    answer = golden(
        """
        00 00 0100 07000000 43000100 00000000   # ifinfomsg: ifindex 7
        c4001700     # IFLA_STATS64 (23), len 4+192: struct rtnl_link_stats64, 24 __u64
        0500000000000000 0300000000000000   # rx_packets 5, tx_packets 3
        """
        + "0000000000000000 " * 4
        + """
        0100000000000000 0200000000000000   # rx_dropped 1, tx_dropped 2
        """
        + "0000000000000000 " * 16
    )
    assert tc.parse_link(answer).stats == tc.LinkStats(5, 3, 1, 2)


def test_parse_qdisc_answer() -> None:
    answer = golden(
        """
        00 000000 07000000 00000100 ffffffff 01000000   # tcmsg: ifindex 7, handle 1:, root, info
        09000100 706c756700 000000   # TCA_KIND "plug"
        1c000700     # TCA_STATS2 (7), len 4+24, nested:
        18000300     #   TCA_STATS_QUEUE (3), len 4+20: struct gnet_stats_queue
        03000000 dc050000 00000000 00000000 00000000   # qlen 3, backlog 1500, drops, requeues, overlimits
        """
    )
    assert tc.parse_qdisc(answer) == tc.Qdisc(7, 0x10000, 0xFFFFFFFF, "plug", 3)

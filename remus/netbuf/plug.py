"""``PlugBuffer``: a guest interface's output held in a kernel ``plug`` qdisc, one epoch at a time.

Theory of operation.  ``install`` builds, for one vif, in this order (each
step recorded in the vif's ownership record before the next begins)::

    ifb       an IFB device named remus<vif ifindex>, up
    plug      a plug qdisc on the IFB's root, with its byte limit; it starts throttled
    ingress   the ingress qdisc on the vif
    redirect  a filter on it sending every frame, whatever its ethertype, to the IFB

The plug goes in before the redirect, so a kernel without sch_plug is found
out before the vif is touched.  From the moment the redirect exists the
guest's output waits in the plug.  The engine then drives it::

    postsuspend  TCQ_PLUG_BUFFER       what the guest sent so far is the closed epoch
    commit       TCQ_PLUG_RELEASE_ONE  the backup holds the checkpoint: let that epoch out

``release`` (on every exit path, and idempotent) and the cleanup of a dead
owner's leftovers run ``teardown``: TCQ_PLUG_RELEASE_INDEFINITE first, so
nothing stays held, then the redirect and the ingress qdisc go (new frames
bypass the IFB), then, once the plug and the IFB have handed back every
frame they held, both are deleted.  Only what the record says was done is
undone; a record whose teardown failed stays for ``remus-netbuf-cleanup``.

Kernel errors become ``NetbufUnavailable`` (this host cannot buffer: no
sch_plug, no ifb, not root) or ``NetbufError`` (this interface cannot be
buffered now), worded through the table ``_ERROR_WORDS``.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from typing import Callable, Optional, TypeVar

from remus.errors import NetbufError, NetbufUnavailable
from remus.netbuf import tc
from remus.netbuf.netlink import NetlinkDecodeError, NetlinkError, RtnlSocket
from remus.netbuf.owners import DEFAULT_STATE_DIR, Ownership, RecordError, RecordStore
from remus.netbuf.tc import PlugAction

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Output rate a plug is sized for: 1 Gbit/s, in bytes per second.
DEFAULT_RATE_BYTES_PER_S = 125_000_000
#: No plug holds less than this many bytes (libxl's remus-netbuf-setup used 10 MB).
MIN_LIMIT_BYTES = 10_000_000
#: The kernel's limit is a __u32.
MAX_LIMIT_BYTES = 0xFFFFFFFF
#: How long teardown waits for released packets to leave the plug and the IFB before deleting them.
DRAIN_TIMEOUT_S = 2.0
_DRAIN_POLL_S = 0.005

#: Errors that mean "already gone" when deleting something.
_GONE = frozenset({errno.ENOENT, errno.ENODEV, errno.EINVAL})

_ROOT_WORDS = (
    "network buffering needs root (CAP_NET_ADMIN) to create the IFB and its qdiscs; "
    "run remus as root, or with --no-net to run without network buffering"
)

#: (install step, errno) -> (exception, message); {vif} and {ifb} are filled in.
_ERROR_WORDS: dict[tuple[str, int], tuple[type[NetbufError], str]] = {
    ("ifb", errno.EOPNOTSUPP): (
        NetbufUnavailable,
        "this kernel cannot create IFB devices, which network buffering needs: "
        "load the module with 'modprobe ifb' (kernel option CONFIG_IFB)",
    ),
    ("ifb", errno.EEXIST): (
        NetbufError,
        "an interface named {ifb} already exists but remus has no record of it; "
        "if it is a leftover, delete it ('ip link del {ifb}') and try again",
    ),
    ("plug", errno.ENOENT): (
        NetbufUnavailable,
        "this kernel has no plug qdisc (sch_plug), which holds the guest's output until the backup "
        "has the checkpoint: load it with 'modprobe sch_plug' (kernel option CONFIG_NET_SCH_PLUG, "
        "Linux 3.4 or later), or run with --no-net",
    ),
    ("ingress", errno.ENOENT): (
        NetbufUnavailable,
        "this kernel has no ingress qdisc: load it with 'modprobe sch_ingress' "
        "(kernel option CONFIG_NET_SCH_INGRESS)",
    ),
    ("ingress", errno.EEXIST): (
        NetbufError,
        "{vif} already has an ingress (or clsact) qdisc that remus did not set up, and remus will not "
        "replace it: remove it ('tc qdisc del dev {vif} ingress') or run with --no-net",
    ),
    ("redirect", errno.ENOENT): (
        NetbufUnavailable,
        "this kernel cannot redirect {vif}'s output to {ifb}: it needs the u32 classifier and the "
        "mirred action ('modprobe cls_u32 act_mirred'; kernel options CONFIG_NET_CLS_U32, "
        "CONFIG_NET_ACT_MIRRED)",
    ),
}


def plug_limit_bytes(interval_ms: int, rate_bytes_per_s: int = DEFAULT_RATE_BYTES_PER_S) -> int:
    """The plug's limit: two checkpoint intervals of output at ``rate_bytes_per_s``.

    Just before an ack the plug holds the epoch waiting for it plus what the
    guest sent since that epoch closed: about two intervals when checkpoints
    take less than an interval.  Never below ``MIN_LIMIT_BYTES``, never above
    the kernel's __u32.  Beyond the limit the plug drops packets, as a full
    link would.
    """
    if interval_ms <= 0 or rate_bytes_per_s <= 0:
        raise ValueError("interval_ms and rate_bytes_per_s must be positive")
    wanted = math.ceil(rate_bytes_per_s * 2 * interval_ms / 1000)
    return min(MAX_LIMIT_BYTES, max(MIN_LIMIT_BYTES, wanted))


def ifb_name(vif_index: int) -> str:
    """The IFB remus makes for the vif with this ifindex: ``remus<ifindex>`` (at most 15 characters)."""
    return f"remus{vif_index}"


def translate(step: str, exc: BaseException, vif: str, ifb: str = "") -> NetbufError:
    """The user-facing error for ``exc`` raised while doing ``step`` for ``vif``."""
    code = getattr(exc, "errno", None)
    if code in (errno.EPERM, errno.EACCES):
        return NetbufUnavailable(_ROOT_WORDS)
    if isinstance(code, int) and (step, code) in _ERROR_WORDS:
        kind, words = _ERROR_WORDS[(step, code)]
        return kind(words.format(vif=vif, ifb=ifb))
    if code == errno.ENODEV:
        return NetbufError(f"interface {vif} (or its IFB {ifb}) vanished while setting up {step}")
    return NetbufError(f"network buffering on {vif}: {step} failed: {exc}")


def lookup_link(rtnl: RtnlSocket, name: str) -> Optional[tc.Link]:
    """The link called ``name``, or None if there is none.

    Raises:
        NetlinkError: any error other than "no such device".
    """
    try:
        answers = rtnl.request(tc.get_link(name))
    except NetlinkError as exc:
        if exc.errno == errno.ENODEV:
            return None
        raise
    for _hdr, payload in answers:
        return tc.parse_link(payload)
    return None


def teardown(rtnl: RtnlSocket, record: Ownership, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Undo what ``record`` says was done, letting every held packet go first.

    Things already gone are fine.  Every step is tried even when one fails.

    Raises:
        NetbufError: some step failed for another reason (the message lists them).
    """
    problems: list[str] = []

    def attempt(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except NetlinkError as exc:
            if exc.errno in _GONE:
                log.debug("%s: %s already gone (%s)", record.vif, what, exc)
            else:
                problems.append(f"{what}: {exc}")
        except (OSError, NetlinkDecodeError) as exc:
            problems.append(f"{what}: {exc}")

    ifb: Optional[tc.Link] = None
    if "ifb" in record.done:
        try:
            ifb = lookup_link(rtnl, record.ifb)
        except (OSError, NetlinkDecodeError) as exc:
            problems.append(f"looking up {record.ifb}: {exc}")
        if ifb is not None and ifb.kind != "ifb":
            problems.append(f"{record.ifb} is a {ifb.kind or 'non-IFB'} device now, not remus's IFB: left alone")
            ifb = None
    index = ifb.ifindex if ifb is not None else 0
    plugged = ifb is not None and "plug" in record.done
    if plugged:
        attempt("releasing the plug", lambda: rtnl.request(tc.plug(index, PlugAction.RELEASE_INDEFINITE)))
    if "redirect" in record.done:
        attempt("removing the redirect", lambda: rtnl.request(tc.del_redirect(record.vif_index)))
    if "ingress" in record.done:
        attempt("removing the ingress qdisc", lambda: rtnl.request(tc.del_ingress(record.vif_index)))
    if plugged:
        attempt("draining the plug", lambda: _wait_drained(rtnl, index, record.ifb, drain_timeout_s))
        attempt("deleting the plug", lambda: rtnl.request(tc.del_plug(index)))
    if ifb is not None:
        attempt(f"deleting {record.ifb}", lambda: rtnl.request(tc.del_link(index)))
    if problems:
        raise NetbufError(f"cleaning up network buffering on {record.vif}: " + "; ".join(problems))


def _wait_drained(rtnl: RtnlSocket, ifb_index: int, ifb: str, timeout_s: float) -> None:
    """Wait until no frame is left in the plug or in the IFB behind it (or ``timeout_s`` passes).

    With the redirect gone nothing new arrives.  The plug is empty when its
    qlen is 0; the IFB has handed every frame back when each one it took
    (rx_packets) was passed on (tx_packets) or dropped on arrival
    (rx_dropped).  Deleting either earlier would drop what they still hold.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        answers = rtnl.request(tc.get_root_qdisc(ifb_index))
        qlen = tc.parse_qdisc(answers[0][1]).qlen if answers else None
        link = lookup_link(rtnl, ifb)
        stats = link.stats if link is not None else None
        in_ifb = stats.rx_packets - stats.tx_packets - stats.rx_dropped if stats is not None else 0
        if not qlen and in_ifb <= 0:
            return
        if time.monotonic() >= deadline:
            log.warning("%s still held %d frames in its plug and %d in itself after %.1f s; deleting it",
                        ifb, qlen or 0, in_ifb, timeout_s)
            return
        time.sleep(_DRAIN_POLL_S)


class PlugBuffer:
    """The checkpointed device for one vif (see the module docstring)."""

    def __init__(
        self,
        vif: str,
        *,
        limit_bytes: int,
        state_dir: str = DEFAULT_STATE_DIR,
        rtnl_factory: Callable[[], RtnlSocket] = RtnlSocket,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        if not 0 < limit_bytes <= MAX_LIMIT_BYTES:
            raise ValueError(f"limit_bytes {limit_bytes} out of range")
        self.vif = vif
        self.limit_bytes = limit_bytes
        self.store = RecordStore(state_dir)
        self._rtnl_factory = rtnl_factory
        self._drain_timeout_s = drain_timeout_s
        self._rtnl: Optional[RtnlSocket] = None
        self._record: Optional[Ownership] = None
        self._ifb_index = 0

    @property
    def name(self) -> str:
        return f"plug:{self.vif}"

    @property
    def record(self) -> Optional[Ownership]:
        """What this device has set up so far (None before ``install`` and after ``release``)."""
        return self._record

    # -- CheckpointDevice ----------------------------------------------------------------
    def install(self) -> None:
        """Create the IFB, the plug, the ingress qdisc and the redirect (see the module docstring).

        On failure everything done so far is undone before the error is raised.

        Raises:
            NetbufUnavailable: this host cannot buffer (no sch_plug, no ifb, not root, ...).
            NetbufError: this vif cannot be buffered (missing, busy, owned by a live remus).
        """
        if self._record is not None:
            raise NetbufError(f"{self.name}: installed twice")
        try:
            self._install()
        except BaseException:
            try:
                self.release()
            except NetbufError as exc:
                log.error("%s", exc)
            raise

    def postsuspend(self) -> None:
        self._plug(PlugAction.BUFFER)

    def preresume(self) -> None:
        pass

    def commit(self) -> None:
        self._plug(PlugAction.RELEASE_ONE)

    def release(self) -> None:
        """Let all held output go and remove everything ``install`` made; safe to repeat.

        Raises:
            NetbufError: something could not be removed (the rest still was); the
                ownership record stays, so ``remus-netbuf-cleanup`` can retry once
                this process is gone.
        """
        try:
            if self._record is not None:
                assert self._rtnl is not None
                record, self._record = self._record, None
                try:
                    teardown(self._rtnl, record, self._drain_timeout_s)
                except NetbufError as exc:
                    raise NetbufError(f"{exc} (once this remus has exited, 'remus-netbuf-cleanup "
                                      f"{record.vif}' tries again)") from exc
                self.store.remove(record.vif)
        finally:
            if self._rtnl is not None:
                self._rtnl.close()
                self._rtnl = None

    # -- internals -----------------------------------------------------------------------
    def _install(self) -> None:
        vif = self.vif
        try:
            self._rtnl = rtnl = self._rtnl_factory()
        except OSError as exc:
            raise NetbufUnavailable(f"cannot open a netlink socket for network buffering: {exc}") from exc
        link = self._kernel("lookup", lambda: lookup_link(rtnl, vif))
        if link is None:
            raise NetbufError(f"interface {vif} does not exist (has the domain's vif gone?)")
        record = Ownership.mine(vif, link.ifindex, ifb_name(link.ifindex))
        self._claim(rtnl, record)
        self._record = record
        self._step("ifb", lambda: rtnl.request(tc.new_ifb(record.ifb)))
        ifb = self._kernel("ifb", lambda: lookup_link(rtnl, record.ifb))
        if ifb is None:
            raise NetbufError(f"{record.ifb}, just created for {vif}, vanished")
        self._ifb_index = ifb.ifindex
        self._step("plug", lambda: rtnl.request(tc.new_plug(ifb.ifindex, self.limit_bytes)))
        self._step("ingress", lambda: rtnl.request(tc.new_ingress(link.ifindex)))
        self._step("redirect", lambda: rtnl.request(tc.new_redirect(link.ifindex, ifb.ifindex)))
        log.info("%s: output buffered through %s (plug limit %d bytes)", vif, record.ifb, self.limit_bytes)

    def _kernel(self, step: str, fn: Callable[[], T]) -> T:
        record = self._record
        try:
            return fn()
        except (OSError, NetlinkDecodeError) as exc:
            raise translate(step, exc, self.vif, record.ifb if record else "") from exc

    def _step(self, step: str, fn: Callable[[], object]) -> None:
        self._kernel(step, fn)
        assert self._record is not None
        self._record = self._record.with_step(step)
        try:
            self.store.update(self._record)
        except OSError as exc:
            raise translate(step, exc, self.vif, self._record.ifb) from exc

    def _claim(self, rtnl: RtnlSocket, record: Ownership) -> None:
        """Write this process's record for the vif, cleaning up after a dead owner first."""
        for _attempt in range(3):
            try:
                if self.store.create(record):
                    return
                old = self.store.read(record.vif)
            except RecordError as exc:
                raise NetbufError(
                    f"{exc}; remove it once nothing of remus is left on {record.vif}, then try again"
                ) from exc
            except OSError as exc:
                raise translate("record", exc, record.vif, record.ifb) from exc
            if old is None:
                continue
            if old.owner_alive():
                raise NetbufError(
                    f"{record.vif} is already buffered by remus (pid {old.pid}); stop that one first"
                )
            log.warning("%s: cleaning up after remus pid %d, which exited without releasing it", record.vif, old.pid)
            teardown(rtnl, old, self._drain_timeout_s)
            self.store.remove(record.vif)
        raise NetbufError(f"could not claim {self.store.path(record.vif)}: it keeps changing")

    def _plug(self, action: PlugAction) -> None:
        if self._record is None or self._rtnl is None:
            raise NetbufError(f"{self.name}: {action.name} before install")
        try:
            self._rtnl.request(tc.plug(self._ifb_index, action))
        except (OSError, NetlinkDecodeError) as exc:
            raise NetbufError(f"{self.name}: TCQ_PLUG_{action.name} on {self._record.ifb} failed: {exc}") from exc

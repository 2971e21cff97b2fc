"""contrib/ocf/remus, the OCF resource agent ocf:remus:remus, on simulated domains.

Every test runs the agent as Pacemaker would (an action as argument, its
parameters in OCF_RESKEY_* variables) on this host only: receivers listen on
127.0.0.1, ports are picked free, state directories and the key are the
test's own.  Two instances with different ports and state directories play
the two nodes of a cluster.  Without a cluster on this host, promotion scores
are checked through a stand-in ``crm_attribute`` that records its arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "contrib" / "ocf" / "remus"
OCF_ROOT = Path(os.environ.get("OCF_ROOT", "/usr/lib/ocf"))
SHELLFUNCS = OCF_ROOT / "lib" / "heartbeat" / "ocf-shellfuncs"
DTD_DIR = Path("/usr/share/resource-agents")
BIN = Path(sys.executable).parent

OCF_SUCCESS, OCF_ERR_GENERIC, OCF_ERR_INSTALLED, OCF_ERR_CONFIGURED = 0, 1, 5, 6
OCF_NOT_RUNNING, OCF_RUNNING_PROMOTED, OCF_FAILED_PROMOTED = 7, 8, 9

needs_ocf = pytest.mark.skipif(
    not SHELLFUNCS.exists(), reason=f"{SHELLFUNCS} missing: apt-get install resource-agents"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def running(pid: int) -> bool:
    """pid runs (a zombie, exited but not yet reaped by init, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def released(path: Path) -> list[tuple[int, str]]:
    """(counter, role) of every packet the simulated guest released to ``output=``."""
    if not path.exists():
        return []
    lines = (line.split() for line in path.read_text().splitlines())
    return [(int(f[0]), f[2]) for f in lines if len(f) == 3]


class Node:
    """One instance of the agent: its parameters, state directory and actions."""

    def __init__(self, name: str, tmp: Path, key: Path, **params: str) -> None:
        self.name = name
        self.state = tmp / name
        self.env = dict(os.environ)
        self.env.update(
            OCF_ROOT=str(OCF_ROOT),
            OCF_RESOURCE_INSTANCE=f"remus-{name}",
            OCF_RESKEY_CRM_meta_timeout="30000",
            OCF_RESKEY_CRM_meta_interval="10000",
        )
        defaults = dict(
            kind="sim",
            port=str(free_port()),
            listen="127.0.0.1",
            key_file=str(key),
            interval="50",
            state_dir=str(self.state),
            bin_dir=str(BIN),
        )
        defaults.update(params)
        for key_, value in defaults.items():
            self.env[f"OCF_RESKEY_{key_}"] = value

    @property
    def port(self) -> int:
        return int(self.env["OCF_RESKEY_port"])

    def run(self, action: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        env = dict(self.env, **extra_env)
        return subprocess.run([str(AGENT), action], env=env, capture_output=True, text=True, timeout=120)

    def rc(self, action: str, **extra_env: str) -> int:
        return self.run(action, **extra_env).returncode

    def ok(self, action: str, expected: int = OCF_SUCCESS) -> None:
        result = self.run(action)
        assert result.returncode == expected, (self.name, action, result, self.logs())

    def status(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "remus-receiver"), "status", f"--control={self.state / 'receiver.sock'}", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def pid(self, name: str) -> Optional[int]:
        try:
            return int((self.state / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return None

    def logs(self) -> str:
        parts = []
        for log in ("receiver.log", "remus.log"):
            path = self.state / log
            if path.exists():
                parts.append(f"--- {self.name}/{log}\n{path.read_text()[-3000:]}")
        return "\n".join(parts)

    def cleanup(self) -> None:
        """Stop whatever the agent left (the test's own pids only)."""
        if self.state.exists():
            self.run("stop")
            for pidfile in self.state.glob("*.pid"):
                try:
                    os.kill(int(pidfile.read_text()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "authkey"
    subprocess.run([str(BIN / "remus-keygen"), f"--key-file={path}"], check=True, capture_output=True, timeout=30)
    return path


@pytest.fixture
def nodes(tmp_path: Path, key: Path) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(name: str, **params: str) -> Node:
        node = Node(name, tmp_path, key, **params)
        made.append(node)
        return node

    yield make
    for node in made:
        node.cleanup()


# ------------------------------------------------------------------ static


def test_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", "-s", "sh", str(AGENT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_agent_is_posix_sh_and_executable() -> None:
    assert AGENT.read_text().startswith("#!/bin/sh\n")
    assert os.access(AGENT, os.X_OK)
    assert AGENT.stat().st_mode & 0o777 == 0o755  # ocf-tester's permission check


@needs_ocf
def test_meta_data_is_valid() -> None:
    result = subprocess.run([str(AGENT), "meta-data"], capture_output=True, text=True,
                            env=dict(os.environ, OCF_ROOT=str(OCF_ROOT)))
    assert result.returncode == OCF_SUCCESS
    root = ET.fromstring(result.stdout)
    params = {p.get("name"): p for p in root.iter("parameter")}
    assert {"domain", "kind", "config", "peer", "port", "key_file", "interval", "control", "state_dir"} <= set(params)
    assert params["domain"].get("required") == "1"
    actions = {a.get("name") for a in root.iter("action")}
    assert {"start", "stop", "monitor", "promote", "demote", "meta-data", "validate-all"} <= actions
    roles = {a.get("role") for a in root.iter("action") if a.get("name") == "monitor"}
    assert roles == {"Promoted", "Unpromoted"}
    if shutil.which("xmllint") and (DTD_DIR / "ra-api-1.dtd").exists():
        lint = subprocess.run(["xmllint", "--noout", "--valid", "-"], input=result.stdout, cwd=DTD_DIR,
                              capture_output=True, text=True)
        assert lint.returncode == 0, lint.stderr


# ------------------------------------------------------------------ validate, probe


@needs_ocf
def test_validate_all(tmp_path: Path) -> None:
    key = tmp_path / "authkey"
    key.write_bytes(b"not read by validate-all")
    node = Node("v", tmp_path, key, domain="vm")
    assert node.rc("validate-all") == OCF_SUCCESS
    assert node.rc("validate-all", OCF_RESKEY_domain="") == OCF_ERR_CONFIGURED
    assert node.rc("validate-all", OCF_RESKEY_kind="kvm") == OCF_ERR_CONFIGURED
    assert node.rc("validate-all", OCF_RESKEY_port="eighty") == OCF_ERR_CONFIGURED
    assert node.rc("validate-all", OCF_RESKEY_kind="xen") == OCF_ERR_CONFIGURED  # no config
    missing = node.run("validate-all", OCF_RESKEY_key_file=str(tmp_path / "nokey"))
    assert missing.returncode == OCF_ERR_INSTALLED
    assert "remus-keygen" in missing.stderr
    assert node.rc("validate-all", OCF_RESKEY_bin_dir=str(tmp_path)) == OCF_ERR_INSTALLED


@needs_ocf
def test_probe_of_a_clean_node_is_not_running(tmp_path: Path) -> None:
    key = tmp_path / "authkey"
    key.write_bytes(b"x")
    node = Node("p", tmp_path, key, domain="vm")
    assert node.rc("monitor", OCF_RESKEY_CRM_meta_interval="0") == OCF_NOT_RUNNING
    assert node.rc("monitor") == OCF_NOT_RUNNING
    # Uninstalled remus: a probe still says "not running", a stop succeeds.
    assert node.rc("monitor", OCF_RESKEY_CRM_meta_interval="0", OCF_RESKEY_bin_dir=str(tmp_path)) == OCF_NOT_RUNNING
    assert node.rc("stop", OCF_RESKEY_bin_dir=str(tmp_path)) == OCF_SUCCESS


# ------------------------------------------------------------------ actions


@needs_ocf
def test_lifecycle_without_a_peer(nodes: Callable[..., Node], tmp_path: Path) -> None:
    out = tmp_path / "vm1.out"
    node = nodes("a", domain="vm1", sim_options=f"memory=4M,packet_rate=100,output={out}")
    node.ok("monitor", OCF_NOT_RUNNING)
    node.ok("start")
    node.ok("monitor", OCF_SUCCESS)
    receiver = node.pid("receiver")
    assert receiver is not None and node.status().returncode == 0
    node.ok("demote")  # demoting an unpromoted instance changes nothing
    node.ok("monitor", OCF_SUCCESS)
    node.ok("promote")
    node.ok("monitor", OCF_RUNNING_PROMOTED)
    # No peer: the guest runs unprotected (remus --blackhole) and emits.
    wait_for(lambda: len(released(out)) >= 3, "the promoted guest's packets")
    assert {role for _, role in released(out)} == {"primary"}
    node.ok("promote")  # promoting a promoted instance changes nothing
    node.ok("monitor", OCF_RUNNING_PROMOTED)
    remus = node.pid("remus")
    assert remus is not None
    node.ok("demote")
    node.ok("monitor", OCF_SUCCESS)
    assert not running(remus)  # the domain does not run on a demoted node
    node.ok("stop")
    node.ok("monitor", OCF_NOT_RUNNING)
    node.ok("stop")
    assert node.status().returncode == 1  # no receiver answers
    # A stop needs only the state directory: with the key gone it still stops everything.
    node.ok("start")
    receiver = node.pid("receiver")
    assert receiver is not None and running(receiver)
    assert node.rc("stop", OCF_RESKEY_key_file=str(tmp_path / "gone")) == OCF_SUCCESS
    assert not running(receiver)


@needs_ocf
def test_promoted_instance_that_lost_its_domain_is_failed_promoted(nodes: Callable[..., Node], tmp_path: Path) -> None:
    node = nodes("a", domain="vm2", sim_options="memory=4M")
    node.ok("start")
    node.ok("promote")
    node.ok("monitor", OCF_RUNNING_PROMOTED)
    remus = node.pid("remus")
    assert remus is not None
    os.kill(remus, signal.SIGKILL)
    wait_for(lambda: node.rc("monitor") == OCF_FAILED_PROMOTED, "monitor to say failed promoted")
    result = node.run("monitor")
    assert "vm2 no longer runs here" in result.stderr
    node.ok("demote")
    node.ok("monitor", OCF_SUCCESS)


@needs_ocf
def test_sim_promoted_without_an_answering_peer_runs_unprotected(nodes: Callable[..., Node], tmp_path: Path) -> None:
    out = tmp_path / "vm6.out"
    node = nodes("a", domain="vm6", sim_options=f"memory=4M,packet_rate=100,output={out}",
                 peer="127.0.0.1", peer_port=str(free_port()))  # nobody listens there
    node.ok("start")
    promote = node.run("promote")
    assert promote.returncode == OCF_SUCCESS, (promote, node.logs())
    assert "running vm6 UNPROTECTED" in promote.stderr
    node.ok("monitor", OCF_RUNNING_PROMOTED)
    wait_for(lambda: len(released(out)) >= 2, "the unprotected guest's packets")
    node.ok("stop")
    node.ok("monitor", OCF_NOT_RUNNING)


def pair(nodes: Callable[..., Node], tmp_path: Path, domain: str) -> tuple[Node, Node, Path]:
    """Two instances of one domain on this host, each the other's peer."""
    out = tmp_path / f"{domain}.out"
    sim = f"memory=4M,packet_rate=200,output={out}"
    a_port, b_port = free_port(), free_port()
    a = nodes("a", domain=domain, sim_options=sim, port=str(a_port), peer="127.0.0.1", peer_port=str(b_port))
    b = nodes("b", domain=domain, sim_options=sim, port=str(b_port), peer="127.0.0.1", peer_port=str(a_port))
    return a, b, out


def status_seq(node: Node) -> Optional[int]:
    """The last committed checkpoint the node's receiver holds (it reports its age), or None."""
    result = node.status()
    if result.returncode != 0:
        return None
    answer = json.loads(result.stdout)
    return answer["seq"] if answer.get("age_s") is not None else None


@needs_ocf
def test_failover_promotes_the_receiver_from_its_last_checkpoint(nodes: Callable[..., Node], tmp_path: Path) -> None:
    a, b, out = pair(nodes, tmp_path, "vm3")
    a.ok("start")
    b.ok("start")
    a.ok("promote")  # no checkpoint anywhere: a starts the guest, protected to b
    a.ok("monitor", OCF_RUNNING_PROMOTED)
    wait_for(lambda: (status_seq(b) or 0) >= 3, "b's receiver to hold checkpoint 3")
    b.ok("monitor", OCF_SUCCESS)
    # a's host dies (the guest lives in a's remus): Pacemaker fences a, promotes b.
    remus = a.pid("remus")
    assert remus is not None
    os.kill(remus, signal.SIGKILL)
    wait_for(lambda: not running(remus), "a's remus to die")
    a.ok("monitor", OCF_FAILED_PROMOTED)
    b.ok("promote")
    b.ok("monitor", OCF_RUNNING_PROMOTED)
    wait_for(lambda: any(role == "backup" for _, role in released(out)), "the backup's first packet")
    packets = released(out)
    primary = [c for c, role in packets if role == "primary"]
    backup = [c for c, role in packets if role == "backup"]
    assert primary, "the primary released nothing before it died"
    assert min(backup) > max(primary), "two live copies: the backup released a counter the primary had released"
    a.ok("demote")
    a.ok("monitor", OCF_SUCCESS)  # a is unpromoted again: a receiver for vm3
    b.ok("demote")
    b.ok("stop")
    a.ok("stop")
    a.ok("monitor", OCF_NOT_RUNNING)
    b.ok("monitor", OCF_NOT_RUNNING)


@needs_ocf
def test_demote_closes_in_order_and_the_peer_starts_fresh(nodes: Callable[..., Node], tmp_path: Path) -> None:
    a, b, out = pair(nodes, tmp_path, "vm4")
    a.ok("start")
    b.ok("start")
    a.ok("promote")
    wait_for(lambda: (status_seq(b) or 0) >= 2, "b's receiver to hold checkpoint 2")
    a.ok("demote")  # remus stops with CLOSE: b drops its checkpoint, activates nothing
    a.ok("monitor", OCF_SUCCESS)
    wait_for(lambda: status_seq(b) is None, "b's receiver to drop the closed session's checkpoint")
    b.ok("monitor", OCF_SUCCESS)
    assert not any(role == "backup" for _, role in released(out))
    b.ok("promote")  # a switchover: b starts the guest fresh, protected to a
    b.ok("monitor", OCF_RUNNING_PROMOTED)
    wait_for(lambda: (status_seq(a) or 0) >= 1, "a's receiver to hold b's first checkpoint")
    assert not any(role == "backup" for _, role in released(out))


def fake_crm_attribute(tmp_path: Path) -> tuple[Path, Path]:
    """A crm_attribute on PATH that appends its arguments to a log."""
    bindir = tmp_path / "crm-bin"
    bindir.mkdir()
    log = tmp_path / "crm_attribute.log"
    script = bindir / "crm_attribute"
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    script.chmod(0o755)
    return bindir, log


@needs_ocf
def test_promotion_scores(nodes: Callable[..., Node], tmp_path: Path) -> None:
    bindir, log = fake_crm_attribute(tmp_path)
    a, b, _ = pair(nodes, tmp_path, "vm5")
    for node in (a, b):
        node.env.update(
            PATH=f"{bindir}:{os.environ['PATH']}",
            OCF_RESKEY_CRM_meta_promotable="true",
            OCF_RESKEY_CRM_meta_clone_max="2",
            OCF_RESKEY_crm_feature_set="3.17.4",
        )

    def last_score() -> str:
        return log.read_text().splitlines()[-1]

    a.ok("start")
    b.ok("start")
    b.ok("monitor", OCF_SUCCESS)
    assert last_score() == "--promotion -v 10 -q"  # a receiver without a checkpoint
    a.ok("promote")
    a.ok("monitor", OCF_RUNNING_PROMOTED)
    assert last_score() == "--promotion -v 100 -q"
    wait_for(lambda: (status_seq(b) or 0) >= 1, "b's receiver to hold a checkpoint")
    b.ok("monitor", OCF_SUCCESS)
    assert last_score() == "--promotion -v 50 -q"  # a receiver holding a checkpoint
    # Outside a promotable clone no score is set.
    lines = len(log.read_text().splitlines())
    for node in (a, b):
        node.env.pop("OCF_RESKEY_CRM_meta_promotable")
    a.ok("monitor", OCF_RUNNING_PROMOTED)
    b.ok("monitor", OCF_SUCCESS)
    assert len(log.read_text().splitlines()) == lines
    b.env["OCF_RESKEY_CRM_meta_promotable"] = "true"
    b.ok("stop")
    assert last_score() == "--promotion -D -q"


# ------------------------------------------------------------------ ocf-tester


@needs_ocf
def test_ocf_tester_passes_on_a_simulated_domain(nodes: Callable[..., Node], tmp_path: Path, key: Path) -> None:
    tester = shutil.which("ocf-tester")
    if tester is None:
        pytest.skip("ocf-tester is not installed (Debian: apt-get install resource-agents)")
    node = nodes("t", domain="vmt", sim_options=f"memory=4M,output={tmp_path / 'vmt.out'}")
    args = [tester, "-n", "remus-test"]
    for name in ("domain", "kind", "port", "listen", "key_file", "interval", "state_dir", "bin_dir", "sim_options"):
        args += ["-o", f"{name}={node.env['OCF_RESKEY_' + name]}"]
    # As root, ocf-tester runs meta-data as the user nobody: the agent must be
    # reachable by nobody, which a checkout under /root or a pytest tmp_path is not.
    public = Path(tempfile.mkdtemp(prefix="remus-ocf-"))
    try:
        public.chmod(0o755)
        agent = public / "remus"
        shutil.copy2(AGENT, agent)
        result = subprocess.run(args + [str(agent)], capture_output=True, text=True, timeout=600,
                                env=dict(os.environ, OCF_ROOT=str(OCF_ROOT)))
    finally:
        shutil.rmtree(public)
    assert result.returncode == 0, (result.stdout, result.stderr, node.logs())
    assert f"{agent} passed all tests" in result.stdout
    assert "* rc=" not in result.stdout  # no check failed along the way


# ------------------------------------------------------------------ Xen, with a stand-in xl


FAKE_XL = """#!/bin/sh
# Stand-in for xl: a domain exists while the file dom-NAME does.
d=$FAKE_XL_DIR
echo "xl $*" >> "$d/calls"
case "$1" in
create) name=$(sed -n 's/^name *= *"\\(.*\\)"/\\1/p' "$2"); touch "$d/dom-$name" ;;
domid) [ -e "$d/dom-$2" ] && echo 7 && exit 0
       echo "Can't get domid of domain name '$2', maybe this domain does not exist." >&2; exit 1 ;;
shutdown) rm -f "$d/dom-$3" ;;
destroy) rm -f "$d/dom-$2" ;;
esac
"""

# remus that cannot reach its backup: exits 1 at once, as when no receiver listens.
FAKE_REMUS = """#!/bin/sh
echo "remus $*" >> "$FAKE_XL_DIR/calls"
echo "remus: no remus-receiver is listening on $1" >&2
exit 1
"""


def xen_node(nodes: Callable[..., Node], tmp_path: Path) -> tuple[Node, Path]:
    fake = tmp_path / "fake-xen"
    fake.mkdir()
    for name, text in (("xl", FAKE_XL), ("remus", FAKE_REMUS)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    (fake / "remus-receiver").symlink_to(BIN / "remus-receiver")
    config = tmp_path / "vmx.cfg"
    config.write_text('name = "vmx"\nmemory = 128\n')
    node = nodes("x", domain="vmx", kind="xen", config=str(config), peer="127.0.0.1",
                 peer_port=str(free_port()), retry="1", bin_dir=str(fake))
    node.env.update(PATH=f"{fake}:{os.environ['PATH']}", FAKE_XL_DIR=str(fake))
    return node, fake


@needs_ocf
def test_xen_promote_creates_protects_and_demote_shuts_down(nodes: Callable[..., Node], tmp_path: Path) -> None:
    node, fake = xen_node(nodes, tmp_path)
    calls = fake / "calls"
    node.ok("start")
    node.ok("monitor", OCF_SUCCESS)
    node.ok("promote")  # no checkpoint: xl create
    assert f"xl create {node.env['OCF_RESKEY_config']}" in calls.read_text()
    node.ok("monitor", OCF_RUNNING_PROMOTED)
    # The peer does not answer: the protector retries remus every `retry` s.
    wait_for(lambda: calls.read_text().count("remus -i 50") >= 2, "the protector's second attempt")
    assert "remus -i 50 -p" in calls.read_text() and " vmx 127.0.0.1" in calls.read_text()
    assert node.status().returncode == 1  # the promoted node runs no receiver
    protector = node.pid("protector")
    assert protector is not None
    # A protector that died is started again by the next monitor.
    os.kill(protector, signal.SIGKILL)
    wait_for(lambda: not running(protector), "the protector to die")
    monitor = node.run("monitor")
    assert monitor.returncode == OCF_RUNNING_PROMOTED and "starting it again" in monitor.stderr
    protector = node.pid("protector")
    assert protector is not None and running(protector)
    node.ok("demote")
    assert "xl shutdown -w vmx" in calls.read_text()
    assert not (fake / "dom-vmx").exists()
    assert not running(protector)
    node.ok("monitor", OCF_SUCCESS)
    node.ok("stop")
    node.ok("monitor", OCF_NOT_RUNNING)


@needs_ocf
def test_xen_domain_running_outside_the_agent(nodes: Callable[..., Node], tmp_path: Path) -> None:
    node, fake = xen_node(nodes, tmp_path)
    (fake / "dom-vmx").touch()  # started by hand, or left from before a reboot of /run
    # A probe reports it as promoted, so Pacemaker never starts a second copy.
    assert node.rc("monitor", OCF_RESKEY_CRM_meta_interval="0") == OCF_RUNNING_PROMOTED
    node.ok("stop")  # stop means: it does not run here
    assert not (fake / "dom-vmx").exists()
    node.ok("monitor", OCF_NOT_RUNNING)

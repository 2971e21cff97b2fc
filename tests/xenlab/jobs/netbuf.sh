#!/bin/sh
# Xen lab job: network output buffering (issue 5), in dom0, whose kernel has sch_plug and ifb.
# Runs with cwd = the checkout and $XENLAB_OUT = a results directory; prints
# "RESULT <name> PASS|FAIL|SKIP <detail>" lines; exits 1 if any FAIL.
#
# Parts ($NETBUF_PARTS, default all, in this order):
#   pytest     the netbuf unit tests and the real-kernel scenarios (test_netbuf_*.py)
#   veth       the real Engine + PlugBuffer on a veth pair (vb in a bridge, "dom0" side in one
#              network namespace, the sender in another): frames of every ethertype, checked
#              against the checkpoints' suspend/ack times, then SIGTERM and the flow after it
#   veth-kill  the same stopped by SIGKILL: output stays blocked until remus-netbuf-cleanup
#   no-net     the same with --no-net: nothing installed
#   guest      a busybox PV guest with a vif on xenbr0 (netfront loaded from dom0's modules)
#              pinging dom0 over IPv4 and IPv6 while its vif is buffered, the guest paused and
#              unpaused with xl as the stand-in for remus's suspend; then SIGTERM
#   guest-kill the guest again, stopped by SIGKILL and cleaned up
set -u
PARTS=${NETBUF_PARTS:-"pytest veth veth-kill no-net guest guest-kill"}
OUT=${XENLAB_OUT:-/tmp/xenlab-out}/netbuf
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LAB="python3 $PWD/tests/xenlab/netbuf_lab.py"
CLEANUP="python3 $PWD/bin/remus-netbuf-cleanup"
FAILED=0
GUEST=netbuf-guest   # not the lab's "domu", which other jobs use
result() { echo "RESULT $1 $2 $3"; [ "$2" != FAIL ] || FAILED=1; }
now() { date +%s.%N; }
marker() { printf '{"event": "%s", "unix": %s}\n' "$2" "$(now)" >> "$1"; }
# wait_for FILE EVENT: until a process we started wrote that marker (Python starts slowly under TCG)
wait_for() {
    for _ in $(seq 1200); do grep -q "\"event\": \"$2\"" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "timed out waiting for $2 in $1"; return 1
}
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
# stop one background process we started, by pid, and reap it
stop() { kill -"$1" "$2" 2>/dev/null; wait "$2" 2>/dev/null; }
# a check's RESULT lines go to the log and count
check() { $LAB check "$@" > "$OUT/check.tmp" 2>&1; cat "$OUT/check.tmp"; grep -q "^RESULT .* FAIL" "$OUT/check.tmp" && FAILED=1; rm -f "$OUT/check.tmp"; }
leftovers() {  # $1: netns ("" for dom0's own), $2: the buffered interface
    ns=${1:+ip netns exec $1}
    links=$($ns ip -o link show | grep -c ': remus' || true)
    ingress=$($ns tc qdisc show dev "$2" 2>/dev/null | grep -c ingress || true)
    records=$(ls /run/remus/netbuf 2>/dev/null | grep -c . || true)   # (coreutils wc dies of SIGILL under this TCG CPU)
    echo "$links IFBs, $ingress ingress qdiscs on $2, $records records"
    [ "$links$ingress$records" = 000 ]
}

modprobe -a sch_plug ifb sch_ingress cls_u32 act_mirred bridge veth 2>/dev/null

if has pytest; then
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_netbuf_*.py > "$OUT/pytest.log" 2>&1
    rc=$?
    summary=$(tail -n 1 "$OUT/pytest.log")
    if [ $rc = 0 ] && ! grep -q "SKIPPED" "$OUT/pytest.log"; then
        result netbuf-pytest PASS "$summary (none skipped: sch_plug present)"
    elif [ $rc = 0 ]; then
        result netbuf-pytest PASS "$summary; $(grep -c SKIPPED "$OUT/pytest.log") skip lines, see pytest.log"
    else
        result netbuf-pytest FAIL "$summary (see netbuf/pytest.log)"
    fi
fi

# --- the veth pair: "guest" namespace nbg (va) -> "dom0" namespace nbh (vb in bridge br0) ---
veth_up() {
    ip netns add nbg && ip netns add nbh || return 1
    ip link add va netns nbg type veth peer name vb netns nbh || return 1
    ip netns exec nbh sh -c 'ip link set lo up; ip link add br0 type bridge; ip link set vb master br0;
                             ip link set vb up; ip link set br0 up' &&
    ip netns exec nbg sh -c 'ip link set lo up; ip link set va up'
}
veth_down() { ip netns del nbg 2>/dev/null; ip netns del nbh 2>/dev/null; }

# finish NAME HOW DIR PROTECT_PID NETNS IFNAME RESUME...: stop the protecting process by SIGTERM
# (HOW=term) or by SIGKILL (HOW=kill); after a SIGKILL, RESUME... restarts the stand-in domain (the
# engine may have left it stopped, as a guest can be left paused), and after a while of blocked
# output remus-netbuf-cleanup runs.  Markers: killed, cleaning, cleaned.
finish() {
    name=$1 how=$2 d=$3 pid=$4 ns=${5:+ip netns exec $5} ifname=$6; shift 6
    if [ "$how" = term ]; then
        stop TERM "$pid"; echo "protect exit status $?" >> "$d/protect.log"
        return
    fi
    stop KILL "$pid"
    marker "$d/markers.jsonl" killed   # after the kill: (date is slow under TCG) frames after it met no remus
    "$@" 2>/dev/null
    sleep 2
    marker "$d/markers.jsonl" cleaning
    $ns $CLEANUP > "$d/cleanup.log" 2>&1; crc=$?
    marker "$d/markers.jsonl" cleaned
    if [ $crc = 0 ] && grep -q "^$ifname: cleaned up" "$d/cleanup.log"; then
        result "$name-cleanup" PASS "$(head -n 1 "$d/cleanup.log")"
    else
        result "$name-cleanup" FAIL "exit $crc: $(cat "$d/cleanup.log")"
    fi
}

# judge NAME HOW DIR NETNS IFNAME [check options]: nothing left behind, and the capture checked
judge() {
    name=$1 how=$2 d=$3 ns=$4 ifname=$5; shift 5
    if leftovers "$ns" "$ifname" > "$d/state.txt"; then result "$name-nothing-left" PASS "$(cat "$d/state.txt")"
    else result "$name-nothing-left" FAIL "$(cat "$d/state.txt")"; fi
    [ "$how" = term ] || set -- "$@" --blocked-marker killed --unblocked-marker cleaned
    check --name "$name" --sniff "$d/sniff.jsonl" --stats "$d/stats.jsonl" --markers "$d/markers.jsonl" "$@"
}

# veth_run NAME HOW [protect options]
veth_run() {
    name=$1 how=$2; shift 2
    d=$OUT/$name; mkdir -p "$d"; rm -f "$d"/*
    veth_up || { result "$name-setup" FAIL "could not make the veth pair"; veth_down; return; }
    ip netns exec nbh $LAB sniff --pre vb --post br0 --out "$d/sniff.jsonl" --markers "$d/markers.jsonl" & sniffer=$!
    ip netns exec nbg $LAB send --ifname va --rate 300 --markers "$d/markers.jsonl" & sender=$!
    wait_for "$d/markers.jsonl" sniffing && wait_for "$d/markers.jsonl" sending
    ip netns exec nbh $LAB protect --pid $sender --vif vb --stats "$d/stats.jsonl" --markers "$d/markers.jsonl" \
        --interval-ms 100 --ack-delay-ms 30 "$@" 2> "$d/protect.log" & protect=$!
    wait_for "$d/markers.jsonl" installed
    sleep 5
    if [ "$name" = netbuf-no-net ]; then
        if leftovers nbh vb > "$d/state.txt"; then result netbuf-no-net PASS "while running: $(cat "$d/state.txt")"
        else result netbuf-no-net FAIL "while running: $(cat "$d/state.txt")"; fi
    fi
    finish "$name" "$how" "$d" $protect nbh vb kill -CONT $sender
    sleep 1.5
    stop TERM $sender
    sleep 0.5
    stop TERM $sniffer
    if [ "$name" = netbuf-no-net ]; then
        # the negative control: the same check must see this unbuffered output leave at once
        $LAB check --name "$name" --sniff "$d/sniff.jsonl" --stats "$d/stats.jsonl" --markers "$d/markers.jsonl" \
            > "$d/check.txt" 2>&1
        if grep -q "^RESULT $name-no-early-release FAIL" "$d/check.txt" && grep -q "^RESULT $name-held FAIL" "$d/check.txt"; then
            result netbuf-no-net-control PASS "unbuffered, the check flags every frame as early: $(grep -o '[0-9]* frames arrived[^;]*' "$d/check.txt")"
        else
            result netbuf-no-net-control FAIL "$(cat "$d/check.txt")"
        fi
    else
        judge "$name" "$how" "$d" nbh vb
    fi
    veth_down
}

has veth && veth_run netbuf-veth term
has veth-kill && veth_run netbuf-veth-kill kill
has no-net && veth_run netbuf-no-net term --no-net

# --- a PV guest with a real vif -------------------------------------------------------------------
guest_up() {
    g=/tmp/netbuf-guest; rm -rf $g; mkdir -p $g/root
    netfront=$(find /lib/modules/"$(uname -r)" -name 'xen-netfront.ko*' | head -n 1)
    [ -n "$netfront" ] || { echo "no xen-netfront module in dom0"; return 1; }
    (cd $g/root && zcat /var/lib/xenlab/domu-initrd.gz | busybox cpio -id 2>/dev/null) || return 1
    case $netfront in *.xz) xz -dc "$netfront" > $g/root/xen-netfront.ko;; *) cp "$netfront" $g/root/xen-netfront.ko;; esac
    cat > $g/root/init <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "domU: netbuf guest up"
busybox insmod /xen-netfront.ko || echo "domU: insmod xen-netfront failed"
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do busybox usleep 100000; i=$((i+1)); done
busybox ip link set lo up
busybox ip link set eth0 up
busybox ip addr add 10.99.0.2/24 dev eth0
busybox ip -6 addr add fd99::2/64 dev eth0
echo "domU: eth0 configured"
until busybox ping -c 1 -W 1 10.99.0.1 >/dev/null 2>&1; do :; done
echo "domU: net up"
(while true; do busybox ping -q -i 0.02 10.99.0.1 >/dev/null 2>&1; busybox usleep 200000; done) &
(while true; do busybox ping6 -q -i 0.05 fd99::1 >/dev/null 2>&1; busybox usleep 200000; done) &
while true; do echo "domU alive"; sleep 5; done
EOF
    chmod +x $g/root/init
    (cd $g/root && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > $g/initrd.gz || return 1
    sed -e "s|^ramdisk.*|ramdisk = \"$g/initrd.gz\"|" -e "s|^name.*|name = \"$GUEST\"|" \
        /var/lib/xenlab/domu.cfg > $g/domu.cfg
    echo "vif = [ 'bridge=xenbr0,mac=00:16:3e:5e:00:02' ]" >> $g/domu.cfg
    ip link show xenbr0 >/dev/null 2>&1 || {
        ip link add xenbr0 type bridge && ip addr add 10.99.0.1/24 dev xenbr0 &&
        ip -6 addr add fd99::1/64 dev xenbr0 nodad && ip link set xenbr0 up; } || return 1
    xl create $g/domu.cfg > $g/create.log 2>&1 || { cat $g/create.log; return 1; }
    for _ in $(seq 120); do
        grep -q "domU: net up" /var/log/xen/console/guest-$GUEST.log 2>/dev/null && return 0
        sleep 1
    done
    echo "guest network did not come up"; tail -n 20 /var/log/xen/console/guest-$GUEST.log; return 1
}

# the guest's vif name, found as remus finds it: xenstore through remus.netbuf.vif_names
guest_vif() {
    python3 - "$(xl domid $GUEST)" <<'EOF'
import subprocess, sys
from remus.netbuf import present_interfaces, vif_names
def read(path):
    done = subprocess.run(["xenstore-read", path], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None
def directory(path):
    done = subprocess.run(["xenstore-list", path], capture_output=True, text=True)
    return done.stdout.split() if done.returncode == 0 else []
print(" ".join(present_interfaces(vif_names(read, directory, int(sys.argv[1])))))
EOF
}

guest_run() {
    name=$1 how=$2
    d=$OUT/$name; mkdir -p "$d"; rm -f "$d"/*
    vif=$(guest_vif 2> "$d/vif.log")
    expected=vif$(xl domid $GUEST).0
    if [ "$vif" = "$expected" ]; then result "$name-vif-names" PASS "xenstore -> $vif (confirmed with netifaces)"
    else result "$name-vif-names" FAIL "got '$vif', expected $expected: $(cat "$d/vif.log")"; return; fi
    xenstore-ls "/local/domain/0/backend/vif/$(xl domid $GUEST)/0" > "$d/backend.txt" 2>&1
    $LAB sniff --pre "$vif" --post xenbr0 --out "$d/sniff.jsonl" --markers "$d/markers.jsonl" & sniffer=$!
    wait_for "$d/markers.jsonl" sniffing
    $LAB protect --xl $GUEST --vif "$vif" --stats "$d/stats.jsonl" --markers "$d/markers.jsonl" \
        --interval-ms 200 --ack-delay-ms 30 2> "$d/protect.log" & protect=$!
    wait_for "$d/markers.jsonl" installed
    sleep 15
    finish "$name" "$how" "$d" $protect "" "$vif" xl unpause $GUEST
    sleep 2
    stop TERM $sniffer
    judge "$name" "$how" "$d" "" "$vif" --kinds icmp,ipv6 --flow-bound-s 1.0
}

if has guest || has guest-kill; then
    if guest_up > "$OUT/guest-up.log" 2>&1; then
        result netbuf-guest-nic PASS "busybox PV guest with netfront on xenbr0: $(grep 'domU: net up' /var/log/xen/console/guest-$GUEST.log | head -n 1)"
        has guest && guest_run netbuf-guest term
        has guest-kill && guest_run netbuf-guest-kill kill
    else
        result netbuf-guest-nic FAIL "$(tail -n 3 "$OUT/guest-up.log" | tr '\n' ' ')"
    fi
    xl destroy $GUEST 2>/dev/null
    ip link del xenbr0 2>/dev/null
fi

exit $FAILED

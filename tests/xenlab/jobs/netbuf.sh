#!/bin/sh
# Lab job (runs in dom0): network output buffering end to end, on dom0's real kernel (which has
# sch_plug and ifb) and with the real remus protecting a PV guest that has a vif.
#
#   netbuf_kernel       tests/test_netbuf_kernel.py's two plug tests (the default run skips them
#                       where the kernel has no sch_plug): each epoch held until its commit, frame
#                       by frame, and remus-netbuf-cleanup after a SIGKILL
#   netbuf_veth_kill_*  the real Engine and PlugBuffer on a veth pair, checkpointing a stand-in
#                       domain (the sender, stopped with SIGSTOP) every 100 ms while it sends frames
#                       of every ethertype; SIGKILL after 4 s, then remus-netbuf-cleanup
#   netbuf_guest_nic    a busybox PV guest (the lab's domu plus xen-netfront from dom0's modules)
#                       with a vif on the bridge xenbr0, pinging dom0 over IPv4 and IPv6; it boots
#                       while the parts above run
#   netbuf_guest_*      remus --blackhole --no-compression -i 100 --stats-json on it: the plug is
#                       found and installed by remus itself; after the first checkpoint (libxc's
#                       live copy of the guest, most of this part's time) and 4 more, SIGTERM: exit
#                       0, the guest running, nothing left
#   netbuf_guest_kill_* remus again, SIGKILLed during its first checkpoint (NETBUF_KILL_AFTER=N: once
#                       N are done; the guest is resumed if the kill left it suspended), then
#                       remus-netbuf-cleanup
#   netbuf_guest_no_net remus --no-net on the guest: after two checkpoints nothing of remus is on
#                       the vif or in dom0 (no IFB, no ingress qdisc, no record); SIGTERM, exit 0
#
# Each run of a protector is judged by netbuf_lab.py check from two captures (the vif, before the
# plug; the bridge, after it) and the checkpoints' suspended_unix/buffered_unix/acked_unix: no frame
# that reached the vif before checkpoint N's BUFFER leaves before N's ack, every frame comes out,
# after a SIGKILL nothing comes out until the cleanup, and after remus is gone frames flow at once.
# NETBUF_PARTS selects parts (default "kernel veth-kill guest guest-kill guest-no-net"; "veth" is the veth pair
# stopped by SIGTERM).  Results and captures go to $REMUS_LAB_OUT/netbuf.
. "$REMUS_LAB_SRC/tests/xenlab/dom0-lib.sh"
PARTS=${NETBUF_PARTS:-"kernel veth-kill guest guest-kill guest-no-net"}
KILL_AFTER=${NETBUF_KILL_AFTER:-0}
FIRST_TIMEOUT=${REMUS_LAB_FIRST_TIMEOUT:-600}
OUT=$REMUS_LAB_OUT/netbuf
GUEST=netbuf-guest   # not the lab's domu, which other jobs use
GUEST_DIR=/tmp/netbuf-guest
GUEST_CONSOLE=/var/log/xen/console/guest-$GUEST.log
mkdir -p "$OUT"
t_job=$(uptime_s)

has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
oneline() { awk '{printf "%s%s", sep, $0; sep = " "}' "$@"; }   # its lines joined by spaces
signal_of() { if [ "$1" = term ]; then echo SIGTERM; else echo SIGKILL; fi; }
marker() { printf '{"event": "%s", "unix": %s}\n' "$2" "$(date +%s.%N)" >> "$1"; }
# wait_for FILE EVENT: until a process we started wrote that marker (Python starts slowly under TCG)
wait_for() {
    _i=0
    while [ $_i -lt 1200 ]; do
        grep -q "\"event\": \"$2\"" "$1" 2>/dev/null && return 0
        sleep 0.1; _i=$((_i + 1))
    done
    echo "timed out waiting for $2 in $1"; return 1
}
# stop SIGNAL PID: signal one background process we started, and reap it (its status is returned)
stop() { kill -"$1" "$2" 2>/dev/null; wait "$2" 2>/dev/null; }
checkpoints() { count_lines "$1" '"event": "checkpoint"'; }
# wait_checkpoints STATS N TIMEOUT_S PID: until STATS holds N checkpoints (false if PID died first)
wait_checkpoints() {
    _i=0
    while [ "$(checkpoints "$1")" -lt "$2" ]; do
        [ $_i -lt "$3" ] && kill -0 "$4" 2>/dev/null || return 1
        sleep 1; _i=$((_i + 1))
    done
}
leftovers() {  # NETNS ("" for dom0's own) IFNAME: nothing of remus left on IFNAME
    _ns=${1:+ip netns exec $1}
    _links=$($_ns ip -o link show | grep -c ': remus')
    _ingress=$($_ns tc qdisc show dev "$2" 2>/dev/null | grep -c ingress)
    _records=$(ls /run/remus/netbuf 2>/dev/null | grep -c .)   # (coreutils wc dies of SIGILL under this TCG CPU)
    echo "$_links IFBs, $_ingress ingress qdiscs on $2, $_records records"
    [ "$_links$_ingress$_records" = 000 ]
}

section "build remus in dom0"
if ! lab_install_remus; then
    result netbuf_build FAIL "could not build remus in dom0 (see remus-build.log)"
    exit 1
fi
LAB="python3 $LAB_BUILD/tests/xenlab/netbuf_lab.py"
CLEANUP="python3 $LAB_BUILD/bin/remus-netbuf-cleanup"
modprobe -a sch_plug ifb sch_ingress cls_u32 act_mirred bridge veth

# ---------------------------------------------------------------------------------- the guest
# It boots (a minute or two under TCG) while the kernel and veth parts run.
guest_start() {
    netfront=$(find /lib/modules/"$(uname -r)" -name 'xen-netfront.ko*' | head -n 1)
    [ -n "$netfront" ] || { echo "no xen-netfront module in dom0"; return 1; }
    rm -rf $GUEST_DIR; mkdir -p $GUEST_DIR/root
    (cd $GUEST_DIR/root && zcat /var/lib/remus-lab/domu-initrd.gz | busybox cpio -id 2>/dev/null) || return 1
    case $netfront in
        *.xz) xz -dc "$netfront" > $GUEST_DIR/root/xen-netfront.ko ;;
        *) cp "$netfront" $GUEST_DIR/root/xen-netfront.ko ;;
    esac
    cat > $GUEST_DIR/root/init <<'EOF'
#!/bin/sh
# The netbuf job's PV guest: eth0 on dom0's xenbr0, pinging dom0 over IPv4 and IPv6 forever.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "domU: netbuf guest up"
busybox insmod /xen-netfront.ko || echo "domU: insmod xen-netfront failed"
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do busybox usleep 100000; i=$((i + 1)); done
busybox ip link set lo up
busybox ip link set eth0 up
busybox ip addr add 10.99.0.2/24 dev eth0
busybox ip -6 addr add fd99::2/64 dev eth0
until busybox ping -c 1 -W 1 10.99.0.1 > /dev/null 2>&1; do :; done
echo "domU: net up"
(while :; do busybox ping -q -i 0.05 10.99.0.1 > /dev/null 2>&1; busybox usleep 200000; done) &
(while :; do busybox ping6 -q -i 0.1 fd99::1 > /dev/null 2>&1; busybox usleep 200000; done) &
while :; do echo "domU alive $(busybox free | busybox grep Mem)"; sleep 5; done
EOF
    chmod 755 $GUEST_DIR/root/init
    (cd $GUEST_DIR/root && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > $GUEST_DIR/initrd.gz || return 1
    sed -e "s|^ramdisk.*|ramdisk = \"$GUEST_DIR/initrd.gz\"|" -e "s|^name.*|name = \"$GUEST\"|" \
        /var/lib/remus-lab/domu.cfg > $GUEST_DIR/guest.cfg
    echo "vif = [ 'bridge=xenbr0,mac=00:16:3e:5e:00:02' ]" >> $GUEST_DIR/guest.cfg
    ip link add xenbr0 type bridge && ip addr add 10.99.0.1/24 dev xenbr0 &&
        ip -6 addr add fd99::1/64 dev xenbr0 nodad && ip link set xenbr0 up || return 1
    lab_xl_create $GUEST $GUEST_DIR/guest.cfg
}

guest_state() { xl_state $GUEST; }

guest_net_up() {
    _i=0
    until grep -q "domU: net up" $GUEST_CONSOLE 2>/dev/null; do
        [ $_i -lt 300 ] || { echo "the guest's network did not come up"; tail -n 20 $GUEST_CONSOLE; return 1; }
        sleep 1; _i=$((_i + 1))
    done
}

if has guest || has guest-kill || has guest-no-net; then
    guest_start > "$OUT/guest-start.log" 2>&1 &
    guest_starter=$!
fi

# ---------------------------------------------------------------------------------- kernel
if has kernel; then
    section "the plug in dom0's kernel (tests/test_netbuf_kernel.py)"
    t0=$(uptime_s)
    python3 -m pytest -q -p no:cacheprovider -rs \
        tests/test_netbuf_kernel.py::test_real_plug_holds_each_epoch_until_its_commit \
        tests/test_netbuf_kernel.py::test_cleanup_after_sigkill_unblocks_the_interface \
        > "$OUT/pytest.log" 2>&1
    rc=$?
    summary=$(tail -n 1 "$OUT/pytest.log")
    ! grep -q SKIPPED "$OUT/pytest.log" && [ $rc = 0 ]
    check netbuf_kernel $? "$summary (none may be skipped: dom0 has sch_plug); part took $(since $t0) s"
fi

# ---------------------------------------------------------------------------------- stopping
# finish NAME HOW DIR PID NETNS IFNAME: stop the protector PID by SIGTERM (HOW=term: it must exit
# 0) or by SIGKILL (HOW=kill: after a while of held output, remus-netbuf-cleanup); then let the
# traffic flow a few seconds.  Markers: stopping, released (term); killed, cleaning, cleaned (kill).
finish() {
    p_name=$1 p_how=$2 p_d=$3 p_pid=$4 p_ns=${5:+ip netns exec $5} p_ifname=$6
    if [ "$p_how" = term ]; then
        marker "$p_d/markers.jsonl" stopping
        kill -TERM "$p_pid" 2>/dev/null
        ( sleep 120; kill -KILL "$p_pid" 2>/dev/null ) &
        p_watchdog=$!
        wait "$p_pid"
        p_rc=$?
        kill $p_watchdog 2>/dev/null
        marker "$p_d/markers.jsonl" released
        p_ok=0 p_state=
        [ $p_rc = 0 ] || p_ok=1
        case $p_name in
            *guest*) p_state=", guest state $(guest_state)"   # running (r), blocked (b) or waiting for a CPU
                     case $p_state in *r-----|*-b----|*------) ;; *) p_ok=1 ;; esac ;;
        esac
        check "${p_name}_exit" $p_ok "exit $p_rc after SIGTERM$p_state: $(tail -n 2 "$p_d/protect.log" | oneline)"
    else
        stop KILL "$p_pid"
        marker "$p_d/markers.jsonl" killed   # after the kill: frames after it met no remus
        case $p_name in
            *guest*) case $(guest_state) in *s*) lab_resume "$(xl domid $GUEST)" && echo "resumed the guest, left suspended" ;; esac ;;
            *) kill -CONT "$SENDER" ;;   # the stand-in domain, maybe left stopped
        esac
        sleep 3
        marker "$p_d/markers.jsonl" cleaning
        $p_ns $CLEANUP > "$p_d/cleanup.log" 2>&1
        p_rc=$?
        marker "$p_d/markers.jsonl" cleaned
        [ $p_rc = 0 ] && grep -q "^$p_ifname: cleaned up" "$p_d/cleanup.log"
        check "${p_name}_cleanup" $? "exit $p_rc: $(oneline "$p_d/cleanup.log")"
    fi
    sleep 3
}

# judge NAME HOW DIR NETNS IFNAME [check options]: nothing left behind, and the captures checked
judge() {
    p_name=$1 p_how=$2 p_d=$3 p_ns=$4 p_ifname=$5; shift 5
    leftovers "$p_ns" "$p_ifname" > "$p_d/state.txt"
    check "${p_name}_nothing_left" $? "$(cat "$p_d/state.txt")"
    if [ "$p_how" = term ]; then
        set -- --open-until stopping "$@"
    else
        set -- --blocked-marker killed --unblocked-marker cleaned "$@"
    fi
    $LAB check --name "$p_name" --sniff "$p_d/sniff.jsonl" --stats "$p_d/stats.jsonl" \
        --markers "$p_d/markers.jsonl" "$@" > "$p_d/check.txt" 2>&1
    cat "$p_d/check.txt"
    p_fails=$(grep -c '^RESULT [^ ]* FAIL' "$p_d/check.txt")
    grep -q '^RESULT' "$p_d/check.txt" || { result "${p_name}_check" FAIL "$(tail -n 3 "$p_d/check.txt")"; p_fails=0; }
    FAILS=$((FAILS + p_fails))
}

# ---------------------------------------------------------------------------------- veth
# The sender in namespace nbg (va) -> namespace nbh, where vb is the "vif" in the bridge br0.
veth_up() {
    ip netns add nbg && ip netns add nbh || return 1
    ip link add va netns nbg type veth peer name vb netns nbh || return 1
    ip netns exec nbh sh -c 'ip link set lo up; ip link add br0 type bridge; ip link set vb master br0;
                             ip link set vb up; ip link set br0 up' &&
    ip netns exec nbg sh -c 'ip link set lo up; ip link set va up'
}
veth_down() { ip netns del nbg 2>/dev/null; ip netns del nbh 2>/dev/null; }

veth_run() {  # NAME HOW
    name=$1 how=$2
    section "$name: Engine + PlugBuffer on a veth pair, 100 ms checkpoints, then $(signal_of $how)"
    t0=$(uptime_s)
    d=$OUT/$name; rm -rf "$d"; mkdir -p "$d"
    veth_up || { result "${name}_setup" FAIL "could not make the veth pair"; veth_down; return; }
    ip netns exec nbh $LAB sniff --pre vb --post br0 --record vb --out "$d/sniff.jsonl" \
        --markers "$d/markers.jsonl" &
    sniffer=$!
    ip netns exec nbg $LAB send --ifname va --rate 150 --markers "$d/markers.jsonl" &
    SENDER=$!
    wait_for "$d/markers.jsonl" sniffing && wait_for "$d/markers.jsonl" sending
    ip netns exec nbh $LAB protect --pid $SENDER --vif vb --stats "$d/stats.jsonl" \
        --interval-ms 100 --ack-delay-ms 30 2> "$d/protect.log" &
    protector=$!
    wait_for "$d/markers.jsonl" installed || result "${name}_installed" FAIL "$(tail -n 3 "$d/protect.log" | oneline)"
    sleep 4
    finish "$name" "$how" "$d" $protector nbh vb
    stop TERM $SENDER
    sleep 0.5
    stop TERM $sniffer
    judge "$name" "$how" "$d" nbh vb
    veth_down
    echo "$name took $(since $t0) s"
}

has veth && veth_run netbuf_veth term
has veth-kill && veth_run netbuf_veth_kill kill

# ---------------------------------------------------------------------------------- guest
guest_run() {  # NAME HOW
    name=$1 how=$2
    if [ "$how" = term ]; then want=5; else want=$KILL_AFTER; fi
    section "$name: remus --blackhole --no-compression -i 100 $GUEST, $want checkpoint(s), then $(signal_of $how)"
    t0=$(uptime_s)
    d=$OUT/$name; rm -rf "$d"; mkdir -p "$d"
    vif=vif$(xl domid $GUEST).0
    $LAB sniff --pre "$vif" --post xenbr0 --record "$vif" --out "$d/sniff.jsonl" --markers "$d/markers.jsonl" &
    sniffer=$!
    wait_for "$d/markers.jsonl" sniffing
    python3 $LAB_BUILD/bin/remus --blackhole --no-compression -i 100 --stats-json "$d/stats.jsonl" $GUEST \
        > "$d/protect.log" 2>&1 &
    protector=$!
    wait_for "$d/markers.jsonl" installed
    installed_rc=$?
    record=$(grep '"event": "installed"' "$d/markers.jsonl")
    ifb=$(echo "$record" | sed -n 's/.*"ifb": "\([^"]*\)".*/\1/p')
    check "${name}_buffered" $installed_rc "remus (pid $(echo "$record" | sed -n 's/.*"pid": \([0-9]*\).*/\1/p'))" \
        "found $vif in xenstore and buffers it through ${ifb:-nothing}: $(tc qdisc show dev "${ifb:-none}" 2>&1 | head -n 1)"
    if [ "$want" = 0 ]; then
        sleep 5
    elif ! wait_checkpoints "$d/stats.jsonl" 1 "$FIRST_TIMEOUT" $protector; then
        result "${name}_checkpoints" FAIL "no first checkpoint within ${FIRST_TIMEOUT}s: $(tail -n 3 "$d/protect.log" | oneline)"
    else
        echo "first checkpoint $(since $t0) s after the start"
        wait_checkpoints "$d/stats.jsonl" "$want" 120 $protector
    fi
    finish "$name" "$how" "$d" $protector "" "$vif"
    stop TERM $sniffer
    judge "$name" "$how" "$d" "" "$vif" --kinds icmp,ipv6 --flow-bound-s 1.0
    echo "$name took $(since $t0) s"
}

guest_no_net() {
    name=netbuf_guest_no_net
    section "$name: remus --no-net --blackhole -i 100 $GUEST installs nothing"
    t0=$(uptime_s)
    d=$OUT/$name; rm -rf "$d"; mkdir -p "$d"
    vif=vif$(xl domid $GUEST).0
    python3 $LAB_BUILD/bin/remus --no-net --blackhole -i 100 --stats-json "$d/stats.jsonl" $GUEST \
        > "$d/protect.log" 2>&1 &
    protector=$!
    if wait_checkpoints "$d/stats.jsonl" 2 "$FIRST_TIMEOUT" $protector; then
        leftovers "" "$vif" > "$d/state.txt"
        check "$name" $? "while checkpointing ($(checkpoints "$d/stats.jsonl") done): $(cat "$d/state.txt")"
    else
        result "$name" FAIL "not two checkpoints within ${FIRST_TIMEOUT}s: $(tail -n 3 "$d/protect.log" | oneline)"
    fi
    finish "$name" term "$d" $protector "" "$vif"
    echo "$name took $(since $t0) s"
}

if has guest || has guest-kill || has guest-no-net; then
    section "the guest's network"
    t0=$(uptime_s)
    if wait $guest_starter && guest_net_up > "$OUT/guest-net.log" 2>&1; then
        result netbuf_guest_nic PASS "busybox PV guest with xen-netfront on xenbr0:" \
            "$(grep -m 1 'domU: net up' $GUEST_CONSOLE); waited $(since $t0) s for it here"
        has guest && guest_run netbuf_guest term
        has guest-kill && guest_run netbuf_guest_kill kill
        has guest-no-net && guest_no_net
    else
        result netbuf_guest_nic FAIL "$(cat "$OUT/guest-start.log" "$OUT/guest-net.log" 2>/dev/null | tail -n 3 | oneline)"
    fi
fi
if has guest || has guest-kill || has guest-no-net; then
    xl destroy $GUEST 2>/dev/null
    ip link del xenbr0 2>/dev/null
    rm -rf $GUEST_DIR
fi

section "netbuf done in $(since $t_job) s"
exit $FAILS

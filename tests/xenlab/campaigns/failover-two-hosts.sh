#!/bin/sh
# Lab campaign on two hosts (not in the suite): the failover of failover-xen.sh and the same
# failover by `xl remus`, with the primary and the backup in two dom0s of their own, each on a
# CPU of its own, REMUS_LAB_PAIRS times (default 3), taking turns at running first.
#
#   bash tests/xenlab/run-two-hosts.sh tests/xenlab/campaigns/failover-two-hosts.sh -t 3600
#
# On one dom0 (failover-xen.sh) both ends of a failover share two emulated CPUs: the killed
# primary's teardown, the receiver and xl completing the standby all run side by side, and the
# backup can take the name domu only once the primary's domain is gone.  Here the primary host
# (REMUS_LAB_ROLE=primary) runs the guest and an agent (labagent.py serve) and nothing else;
# the backup host drives the campaign through that agent and times everything on its own clock:
#   remus      remus-receiver --once on the backup; `remus -i 200 domu BACKUP` on the primary
#              until the first checkpoint and REMUS_LAB_FAILOVER_MORE (3) more are committed;
#              then the primary's remus is SIGKILLed (its guest runs on, as when remus alone
#              dies: its host is not fenced here).  The receiver must activate domu, which must
#              run on the backup with its console counter going on from the primary's.
#   xl remus   `xl migrate-receive -r` on the backup, given the connection itself (labagent.py
#              accept: xl reads and writes the socket, as it would ssh's pipes); `xl -vvv remus -F -n -i 200 -s '' domu 'labagent.py pipe BACKUP PORT'`
#              on the primary, until its first checkpoint and 3 more; then the primary's xl and
#              its pipe are SIGKILLed together.
# Each is timed from the moment the backup sends the kill (the agent's answer bounds the kill:
# its round trip is printed) to the standby xl's exit (it unpauses the domain, then exits), to
# domu running (xl list), and to the guest's next console line, by the same watchers as
# failover-xen.sh (failover-lib.sh).  Between parts both hosts get a fresh guest: the
# failed-over domu is destroyed on the backup, the primary's recreated.
# Prints a RESULT per part (PASS: remus's failover worked; the peer's is PASS or SKIP when its
# standby did not complete) and, at the end, the table and ratios of failover-pairs.sh
# (two-hosts-pairs.tsv; pairtable.py).  The ratios are measurements, not assertions.
# REMUS_LAB_CPU=1 (off by default): for each failover, what used the backup's CPU from the kill
# to the standby xl's exit, per process; REMUS_LAB_XL_TRACE=1: when each standby's xl reached
# the landmarks of its completion (both as in failover-xen.sh).
. "$REMUS_LAB_SRC/tests/xenlab/dom0-lib.sh"
. "$REMUS_LAB_SRC/tests/xenlab/failover-lib.sh"
ROLE=${REMUS_LAB_ROLE:?run by run-two-hosts.sh, which sets REMUS_LAB_ROLE}
SELF=$REMUS_LAB_SELF_IP PEER=$REMUS_LAB_PEER_IP
PAIRS=${REMUS_LAB_PAIRS:-3}
MORE=${REMUS_LAB_FAILOVER_MORE:-3}
FIRST_TIMEOUT=${REMUS_LAB_FIRST_TIMEOUT:-900}
OUTD=$REMUS_LAB_OUT
EVENTS=$OUTD/two-hosts-events.jsonl
CONSOLES="/var/log/xen/console/guest-domu.log /var/log/xen/console/guest-domu--incoming.log"
AGENT_PORT=7000 XL_PORT=8003  # remus and remus-receiver use their default, 8002
AGENT="python3 $REMUS_LAB_SRC/tests/xenlab/labagent.py"
KEY=/tmp/remus-lab-two-hosts.key  # not on the results mount: a key file must be private
KEYARGS="--key-file $KEY"
CPU=${REMUS_LAB_CPU:-0}  # as in failover-xen.sh: what used the backup's CPU in each failover
CPU_SNAPS=/tmp/remus-lab-cpu
xl_trace_setup  # REMUS_LAB_XL_TRACE=1: both standbys' xl stamped line by line, as in failover-xen.sh

section "the link between the hosts: this is the $ROLE, $SELF"
modprobe virtio_net
nic=$(ls /sys/class/net | grep -v -x -e lo | head -1)
ip addr add "$SELF/24" dev "$nic" && ip link set "$nic" up
check two_hosts_link $? "$ROLE: $nic is $SELF/24"
lab_install_remus || { result two_hosts_build FAIL "$ROLE: remus did not build in dom0"; exit 1; }

if [ "$ROLE" = primary ]; then
    lab_domu_up || { result two_hosts_guest FAIL "the primary's domu did not come up"; exit 1; }
    echo "domu runs (counter $(domu_counter)); serving the backup on $SELF:$AGENT_PORT until it is done"
    $AGENT serve "$SELF" $AGENT_PORT
    exit $?
fi

# ---------------------------------------------------------------------------------- the backup
on_primary() { $AGENT sh "$PEER" $AGENT_PORT "$1"; }
LIB=". $REMUS_LAB_SRC/tests/xenlab/dom0-lib.sh"
finish() {  # the primary stops serving and powers off; this host's exit status says the rest
    $AGENT bye "$PEER" $AGENT_PORT > /dev/null 2>&1
    exit "$1"
}
$AGENT wait "$PEER" $AGENT_PORT 1200 || { result two_hosts_agent FAIL "no agent on the primary"; exit 1; }
on_primary "$LIB; lab_domu_up" || { result two_hosts_guest FAIL "the primary's domu did not come up"; finish 1; }
python3 $LAB_BUILD/bin/remus-keygen --key-file "$KEY" --force > /dev/null &&
    on_primary "umask 077 && echo $(base64 -w0 "$KEY") | base64 -d > $KEY" ||
    { result two_hosts_key FAIL "no shared key"; finish 1; }
echo "the primary's guest runs (counter $(on_primary "$LIB; domu_counter")), the key is on both hosts"
# A guest of its own on the backup first, until it prints, then destroyed: the first console a
# dom0 sets up after its boot costs xenconsoled about 2 s of its one CPU, which would otherwise
# fall into the first failover timed here (xl waits for the console), whichever tool's it is.
lab_domu_up && xl destroy domu || { result two_hosts_warm_up FAIL "no guest on the backup"; finish 1; }

# kill_on_primary PID...: SIGKILL PIDs on the primary (through the agent); sets T_KILL (this
# host's boot time just before asking), T_KILL_WALL (its wall time), KILL_RTT, and, once the standby xl exited, UNPAUSED_S
# (with REMUS_LAB_CPU=1, /proc is snapshot just before asking, as end_clocked does)
kill_on_primary() {
    set -- $(EXITCLOCK_SNAPSHOT=${CLOCK_SNAP:+$CLOCK_SNAP-before} $AGENT kill "$PEER" $AGENT_PORT "$@")
    T_KILL=$1 T_KILL_WALL=$2 KILL_RTT=$3
    wait $CLOCK_PIDS
    UNPAUSED_S=$(after_kill "$CLOCKED-standby-xl-exit")
}
# after_failover TAG MARKS: the new domu runs and printed; sets RUNNING_S and PRINTING_S ("nan" if not)
after_failover() {
    RUNNING_S=nan PRINTING_S=nan
    poll_fast 120 runs_as_new none && RUNNING_S=$(since "$T_KILL")
    poll_fast 120 has_new_counters "$2" 1 && PRINTING_S=$(line_s "$1")
    [ "$PRINTING_S" != nan ] || kill $LINE_PID 2>/dev/null
}
# fresh_guests: no domu on the backup, a fresh one running on the primary
fresh_guests() {
    pkill -KILL -f "$STANDBY_XL_PATTERN"
    for _name in domu domu--incoming; do xl destroy $_name > /dev/null 2>&1; done
    on_primary "xl destroy domu > /dev/null 2>&1; $LIB; lab_domu_up"
}
xl_checkpoints() { on_primary "grep -c 'Checkpointed save' /tmp/xl-remus-$1.log"; }
# xl_reach PAIR N PID: pair PAIR's `xl remus` (PID on the primary) made N checkpoints, or there
# is no point waiting (it ended, or the standby's xl here did); one question to the agent
xl_reach() {
    gone $XL_RECEIVE && return 0
    _said=$(on_primary "kill -0 $3 2>/dev/null || echo ended; grep -c 'Checkpointed save' /tmp/xl-remus-$1.log")
    case $_said in ended*) return 0 ;; esac
    [ "${_said:-0}" -ge "$2" ]
}
commits_reach() { [ "$(commits)" -ge "$1" ] || gone $RECEIVER; }

remus_part() {  # $1: pair number; sets REMUS_UNPAUSED_S, REMUS_PRINTING_S ("nan": no failover)
    _tag=remus-$1
    REMUS_UNPAUSED_S=nan REMUS_PRINTING_S=nan
    rm -f "$EVENTS"
    env PATH="$RX_PATH" python3 $LAB_BUILD/bin/remus-receiver --once --listen "$SELF" --heartbeat-timeout 60000 $KEYARGS \
        --max-memory 128G --events-json "$EVENTS" > $OUTD/$_tag-receiver.log 2>&1 &
    RECEIVER=$!
    poll 0.2 60 sh -c "ss -Hltn 'sport = :8002' | grep -q ."
    # --ack-timeout: under emulation the first checkpoint (the whole guest) can take the receiver
    # longer than the default 5 s; the heartbeat timeout likewise (failover-xen.sh).
    _remus=$(on_primary "cd $LAB_BUILD; python3 bin/remus -i 200 --ack-timeout 60000 $KEYARGS domu $SELF \
        > /tmp/$_tag.log 2>&1 & echo \$!")
    _t0=$(uptime_s)
    poll_until "$FIRST_TIMEOUT" commits_reach 1
    _first=$(since "$_t0")
    mark=$(on_primary "$LIB; domu_counter")  # see failover-xen.sh: every later checkpoint holds more
    n0=$(commits)
    poll_until 300 commits_reach $((n0 + MORE))
    if [ "$(commits)" -lt $((n0 + MORE)) ] || gone $RECEIVER; then
        result two_hosts_$_tag FAIL "$(commits) checkpoints committed in $(since "$_t0")s; remus said:" \
            "$(on_primary "tail -3 /tmp/$_tag.log")"
        kill $RECEIVER; on_primary "kill -KILL $_remus"; wait $RECEIVER
        return 1
    fi
    _state=$(xl_state domu--incoming) _rss=$(rss_mib $RECEIVER) _standby=$(standby_xl)
    clock_exits $_tag "" "$_standby" $RECEIVER
    marks=$(console_marks)
    clock_line $_tag "$marks"
    kill_on_primary "$_remus"
    after_failover $_tag "$marks"
    cpu_window $_tag
    xl_phases "remus's standby" "$_standby"
    poll_until 120 gone $RECEIVER
    wait $RECEIVER; _rrc=$?
    poll_until 30 has_new_counters "$marks" 3
    _counters=$(new_counters "$marks" | tr '\n' ' ')
    _said=$(grep -c "activated xen:domu from checkpoint" $OUTD/$_tag-receiver.log)
    activation_env "$EVENTS" "$T_KILL_WALL" > $OUTD/$_tag-activated.env
    . $OUTD/$_tag-activated.env
    _ok=0
    [ "$_rrc" = 0 ] && [ "$_said" = 1 ] && [ "$PRINTING_S" != nan ] || _ok=1
    case $_state in --p*) ;; *) _ok=1 ;; esac
    python3 -c 'import sys
mark, seen = int(sys.argv[1] or 0), [int(c) for c in sys.argv[2].split()]
sys.exit(not (len(seen) >= 3 and min(seen) > mark and seen[-1] > seen[0]))' "$mark" "$_counters" || _ok=1
    check two_hosts_$_tag $_ok "receiver exit $_rrc, activations said $_said; domu--incoming $_state" \
        "(receiver RSS $_rss MiB) after $(commits) checkpoints (the first after ${_first}s); SIGKILL" \
        "(round trip ${KILL_RTT}s) to unpaused ${UNPAUSED_S}s, to running ${RUNNING_S}s, to the" \
        "guest's next line ${PRINTING_S}s (activate() ${restore_s}s: $parts); checkpoint $seq activated;" \
        "counter $mark before, then $(echo $_counters | cut -d' ' -f1-4)"
    tail -2 $OUTD/$_tag-receiver.log
    REMUS_UNPAUSED_S=$UNPAUSED_S REMUS_PRINTING_S=$PRINTING_S
    [ $_ok = 0 ]
}

xl_part() {  # $1: pair number; sets XL_UNPAUSED_S, XL_PRINTING_S ("nan": no failover)
    _tag=xl-remus-$1
    XL_UNPAUSED_S=nan XL_PRINTING_S=nan
    $AGENT accept "$SELF" $XL_PORT $XL_RUNE 2> $OUTD/$_tag-receive.log &
    XL_RECEIVE=$!
    poll 0.2 60 grep -q "listening on" $OUTD/$_tag-receive.log
    _xl=$(on_primary "xl -vvv remus -F -n -i 200 -s '' domu \
        'exec $AGENT pipe $SELF $XL_PORT' > /tmp/xl-remus-$1.log 2>&1 & echo \$!")
    _t0=$(uptime_s)
    poll 5 "$FIRST_TIMEOUT" xl_reach "$1" $((1 + MORE)) "$_xl"
    _n=$(xl_checkpoints "$1")
    _pipe=$(on_primary "pgrep -P $_xl -f 'labagent.py pipe'")
    if [ "$_n" -lt $((1 + MORE)) ] || gone $XL_RECEIVE || [ -z "$_pipe" ]; then
        result two_hosts_$_tag SKIP "xl remus made $_n checkpoints in $(since "$_t0")s" \
            "(pipe: ${_pipe:-none}); its log ends: $(on_primary "tail -2 /tmp/xl-remus-$1.log")"
        on_primary "kill -KILL $_xl $_pipe"; kill -KILL $XL_RECEIVE; wait $XL_RECEIVE
        return 1
    fi
    _state=$(xl_state domu--incoming)
    clock_exits $_tag "" $XL_RECEIVE
    marks=$(console_marks)
    clock_line $_tag "$marks"
    kill_on_primary "$_xl" "$_pipe"
    after_failover $_tag "$marks"
    cpu_window $_tag
    xl_phases "xl remus's standby" $XL_RECEIVE
    wait $XL_RECEIVE; _xrc=$?
    if [ "$PRINTING_S" = nan ] || [ "$_xrc" != 0 ]; then
        result two_hosts_$_tag SKIP "xl remus's standby did not run and print within 120 s (xl exit $_xrc," \
            "unpaused ${UNPAUSED_S}s; see $_tag-receive.log)"
        return 1
    fi
    result two_hosts_$_tag PASS "domu--incoming $_state after $_n checkpoints; SIGKILL (round trip" \
        "${KILL_RTT}s) to unpaused ${UNPAUSED_S}s, to running ${RUNNING_S}s, to the guest's next" \
        "line ${PRINTING_S}s"
    XL_UNPAUSED_S=$UNPAUSED_S XL_PRINTING_S=$PRINTING_S
}

TABLE=$OUTD/two-hosts-pairs.tsv
printf 'pair\torder\tremus_unpaused\tremus_next_line\txl_remus_unpaused\txl_remus_next_line\n' > $TABLE
i=1
while [ $i -le "$PAIRS" ]; do
    if [ $((i % 2)) = 1 ]; then order=remus_first; else order=xl_first; fi
    section "pair $i of $PAIRS ($order)"
    for part in $(if [ $order = remus_first ]; then echo remus xl; else echo xl remus; fi); do
        ${part}_part $i
        fresh_guests || { result two_hosts_guest FAIL "no fresh guest after pair $i's $part part"; finish 1; }
    done
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' $i $order "$REMUS_UNPAUSED_S" "$REMUS_PRINTING_S" \
        "$XL_UNPAUSED_S" "$XL_PRINTING_S" >> $TABLE
    i=$((i + 1))
done
section "two hosts: remus against xl remus, SIGKILL to the standby's unpause and to the guest's next line"
python3 "$REMUS_LAB_SRC/tests/xenlab/pairtable.py" $TABLE
finish $FAILS

#!/bin/sh
# Lab job (runs in dom0): the hot standby and failover of the lab's PV guest to a remus-receiver
# on the same host, and the same failover by `xl remus` for comparison, in one boot.
#
#   failover_build     the project and its cffi binding build in dom0, the guest runs
#   standby_orderly    remus-receiver --once and remus -i 200 domu 127.0.0.1 until 2 checkpoints
#                      are acknowledged, `domu--incoming` paused meanwhile; then remus is stopped
#                      by SIGINT: the receiver exits 0, exactly one `domu` (the primary, running)
#                      and no `domu--incoming` are left
#   standby_receiver_killed  the same, then the receiver is SIGKILLed: its guard destroys the
#                      standby (no failover), the primary runs on, no second domu appears
#   failover_xen       the same until the first checkpoint and REMUS_LAB_FAILOVER_MORE (3) more;
#                      `domu--incoming` paused; the receiver's RSS measured; then the primary
#                      dies: remus is frozen (SIGSTOP), the domain destroyed, remus SIGKILLed.  The
#                      receiver must activate domu from its last acknowledged checkpoint and say
#                      so in one line (exit 0); the new domu runs (r or b) under its new id; its
#                      console counter goes on from where the primary's was (every value it
#                      prints is above the last one printed before the last acknowledged
#                      checkpoint, so no fresh boot) and keeps advancing.
#                      Measured: SIGKILL to unpaused (the standby's xl exits right after it
#                      unpauses the domain; clocked by a pidfd waiter, see clock_exits), to running
#                      (polled with xl list), to the guest's next console line, activate() alone
#                      (restore_s); the primary's RSS before the kill, how long the killed primary
#                      took to exit (its memory is torn down before its sockets close, so that
#                      delays the loss seen) and when the receiver exited
#   xl_remus_failover  `xl -vvv remus -F -n -i 200 -s '' domu 'xl migrate-receive -r'` on the
#                      failed-over guest, killed the same way after its first checkpoint and 3
#                      more; measured the same; the ratio remus/xl (a measurement, not an assertion)
#
# Why freeze, destroy, then kill: on one host the backup can take the name domu only once the
# primary's domain is gone (XENLAB.md), and a primary left running would see its domain die and
# end its session before `xl destroy` had released the name.  Frozen, it sends nothing; the
# SIGKILL then closes its connection, which the backup sees at once as the primary's death
# (a heartbeat timeout of 60 s keeps the frozen seconds from counting as one).
# REMUS_LAB_IDLE_DYING=1 (an experiment, off by default): the frozen primary's threads are put at
# SCHED_IDLE before the kill, so that its teardown (about 0.3 s, on one of dom0's two vCPUs, now
# that the death watch shows the loss before it) yields to xl completing the standby.  In three
# runs it did not make xl quicker (docs/standby.md).
# REMUS_LAB_XL_TRACE=1 (off by default): both standbys' `xl migrate-receive -r` run with -vvv
# through tests/xenlab/xltrace.py, which stamps every line of xl's stderr; after each failover
# the job prints when xl reached each landmark of its completion, counted from the kill (the
# logs are kept in xl-trace/).
# REMUS_LAB_VANISH=1 (off by default): remus's primary "vanishes" instead of being SIGKILLed.
# Its connection to the receiver is shut (exitclock.py shut) while it stays frozen, and it is
# killed only after the guest's next line; its times count from the shutdown.  On this one dom0
# a killed primary's teardown (0.2 to 0.5 s of its address space, under emulation) runs beside
# xl completing the standby; across two hosts it would not (docs/standby.md).
# REMUS_LAB_BALLAST=PRIVATE_MIB:SHARED_MIB (an experiment, off by default; "1" means 32:64):
# `xl remus`'s primary dies beside a process shaped like remus's (tests/xenlab/ballast.py: that
# much private memory, and a shared mapping whose page-table entries it dropped, as remus's
# compression cache; and, as the primary holds pages of its domain through libxc, a page of domu,
# so that the destroyed domu stays dying until its teardown), frozen with it and SIGKILLed at the
# same moment, so that both failovers run beside the same teardown on this one dom0.  The peer's
# RESULT then says "ballast".
# REMUS_LAB_XL_FIRST=1 (off by default): the peer's failover runs first, on the fresh guest, and
# remus then protects the guest `xl remus` failed over (or, when that failover did not complete, a
# freshly created one): whether the order of the two parts is what makes one of them slower.
# REMUS_LAB_SPLIT=1 (an experiment, off by default): the two hosts of a failover on this one
# dom0, apart on the CPU: dom0's vCPU 0 and the guest run on physical CPU 0 with the primary's
# processes (remus, or `xl remus` and its save helper), dom0's vCPU 1 and the standby on CPU 1
# with the backup's (remus-receiver and its xl, or `xl remus`'s `xl migrate-receive -r`).  Both
# failovers are placed the same way; so a killed primary's teardown runs on its own CPU, as it
# would on its own host.  Shared services (xenstored, xenconsoled, dom0's kernel threads) stay
# where Linux puts them.
# REMUS_LAB_CPU=1 (off by default): what used dom0's CPUs from the kill to the standby xl's exit,
# per process (tests/xenlab/cpuwindow.py; snapshots of /proc in /tmp, taken by exitclock.py just
# before its kill or shutdown and just after that exit), printed for both failovers.
# FAILOVER_PARTS selects parts (default "orderly receiver-killed failover peer"; peer needs failover).
# A standby gets its console (and xenconsoled its log file, named after the domain then) only at
# failover, as `domu--incoming`: the job reads the new counter lines from both log files.  At the
# end the failed-over guest is replaced by a freshly created domu for the jobs after this one.
. "$REMUS_LAB_SRC/tests/xenlab/dom0-lib.sh"
. "$REMUS_LAB_SRC/tests/xenlab/failover-lib.sh"
FIRST_TIMEOUT=${REMUS_LAB_FIRST_TIMEOUT:-600}
MORE=${REMUS_LAB_FAILOVER_MORE:-3}
RESTORE_TIMEOUT=${REMUS_LAB_RESTORE_TIMEOUT:-900}
OUTD=$REMUS_LAB_OUT
EVENTS=$OUTD/failover-events.jsonl
STATS=$OUTD/failover-stats.jsonl
CONSOLES="/var/log/xen/console/guest-domu.log /var/log/xen/console/guest-domu--incoming.log"
PARTS=${FAILOVER_PARTS:-"orderly receiver-killed failover peer"}
has_part() { case " $PARTS " in *" $1 "*) true ;; *) false ;; esac; }
KEY=/tmp/remus-lab-failover.key  # not on the results mount: a key file must be private
PORT=8002  # remus's and remus-receiver's default
VANISH=${REMUS_LAB_VANISH:-0}
BALLAST=${REMUS_LAB_BALLAST:-}
[ "$BALLAST" = 1 ] && BALLAST=32:64
XL_FIRST=${REMUS_LAB_XL_FIRST:-0}
SPLIT=${REMUS_LAB_SPLIT:-0}
CPU=${REMUS_LAB_CPU:-0}
CPU_SNAPS=/tmp/remus-lab-cpu  # the snapshots of REMUS_LAB_CPU: dom0's disk, not the results mount
# ON_PRIMARY / ON_BACKUP: the command prefix that places a process on its host's CPU (split only)
ON_PRIMARY= ON_BACKUP= SPLIT_SAID=

section "build remus and its Xen binding in dom0; the lab's PV guest"
lab_install_remus && lab_domu_up
check failover_build $? "domu id $(xl domid domu 2>/dev/null), counter $(domu_counter), state $(domu_state)"
[ "$FAILS" = 0 ] || exit 1
# The link is authenticated (issue 8): both sides get a throw-away key.
KEYARGS=
MAXMEM=
python3 $LAB_BUILD/bin/remus-receiver --help 2>/dev/null | grep -q -- --max-memory && MAXMEM="--max-memory 128G"
if [ -f $LAB_BUILD/bin/remus-keygen ]; then
    python3 $LAB_BUILD/bin/remus-keygen --key-file "$KEY" --force > /dev/null && KEYARGS="--key-file $KEY"
fi
xl_trace_setup
if [ "$SPLIT" = 1 ]; then
    xl vcpu-pin Domain-0 0 0 && xl vcpu-pin Domain-0 1 1 || { result failover_split FAIL "could not pin dom0's vCPUs"; exit 1; }
    ON_PRIMARY="taskset -c 0" ON_BACKUP="taskset -c 1" XL_RUNE="taskset -c 1 $XL_RUNE"
    SPLIT_SAID="; split: each host on its own CPU (REMUS_LAB_SPLIT=1)"
    echo "REMUS_LAB_SPLIT: dom0 vCPU 0 and domu on CPU 0 with the primary, vCPU 1 and the standby on CPU 1 with the backup"
fi
# place_guest NAME CPU: with REMUS_LAB_SPLIT=1, NAME's vCPUs on that physical CPU only
place_guest() { [ "$SPLIT" = 1 ] || return 0; xl vcpu-pin "$1" all "$2"; }
# placement PID...: with REMUS_LAB_SPLIT=1, where each vCPU runs and may run, and each PID's CPUs
placement() {
    [ "$SPLIT" = 1 ] || return 0
    echo "placement: $(xl vcpu-list 2>/dev/null | awk 'NR > 1 {printf "%s%s/%s on %s (%s)", sep, $1, $3, $4, $7; sep = ", "}')"
    for _p in "$@"; do echo "  pid $_p: $(taskset -c -p $_p 2>/dev/null | sed 's/.*: //') $(ps -o args= -p $_p | cut -c1-60)"; done
}

# commits_reach N: N checkpoints committed, or no point waiting (remus or the receiver ended)
commits_reach() { [ "$(commits)" -ge "$1" ] || gone $REMUS || gone $RECEIVER; }
# both_run_with N: N checkpoints committed and both still running
both_run_with() { [ "$(commits)" -ge "$1" ] && ! gone $REMUS && ! gone $RECEIVER; }
no_domain() { ! xl domid "$1" > /dev/null 2>&1; }
domains_named() { xl list 2>/dev/null | awk -v n="$1" '$1 == n' | grep -c ''; }
# dying_domains: what `xl list` shows as dying ("(null)": destroyed, its memory still referenced,
# e.g. mapped by a process that has not let go of it yet), or "none"
dying_domains() {
    xl list 2>/dev/null | awk 'NR > 1 && $1 == "(null)" {printf "%sid %s (%s MiB, %s)", sep, $2, $3, $5; sep = ", "}
                               END {if (!sep) printf "none"}'
}
# end_clocked kill PRIMARY: SIGKILL it (frozen, its domain destroyed), stamped by the same clock;
# end_clocked shut PRIMARY PORT (REMUS_LAB_VANISH=1): shut the frozen PRIMARY's connections to
# PORT instead and leave it frozen.  Either returns once the standby xl exited and sets T_KILL
# (boot time, /proc/uptime's clock), T_KILL_WALL, UNPAUSED_S and PRIMARY_EXIT_S (seconds after
# the kill, or nan: a primary not clocked or not ended); receiver_exit_s says the receiver's,
# once it has ended.  With REMUS_LAB_CPU=1, /proc is snapshot just before the kill or shutdown.
end_clocked() {
    set -- $(EXITCLOCK_SNAPSHOT=${CLOCK_SNAP:+$CLOCK_SNAP-before} python3 "$REMUS_LAB_SRC/tests/xenlab/exitclock.py" "$@")
    T_KILL=$1 T_KILL_WALL=$2
    wait $CLOCK_PIDS
    UNPAUSED_S=$(after_kill "$CLOCKED-standby-xl-exit") PRIMARY_EXIT_S=$(after_kill "$CLOCKED-primary-exit")
}

start_protection() {  # $1: tag; remus-receiver --once, then remus -i 200 domu 127.0.0.1
    rm -f "$EVENTS" "$STATS"
    # --max-memory: generous, so the small lab dom0 never refuses the guest (the bound is tested in tests/).
    place_guest domu 0
    env PATH="$RX_PATH" $ON_BACKUP python3 $LAB_BUILD/bin/remus-receiver --once --listen 127.0.0.1 --heartbeat-timeout 60000 $KEYARGS \
        $MAXMEM --events-json "$EVENTS" > $OUTD/$1-receiver.log 2>&1 &
    RECEIVER=$!
    sleep 2
    # Background jobs of a non-interactive sh ignore SIGINT: give remus the default back.
    # --ack-timeout: under emulation the receiver can take longer than the default 5 s to take in
    # a megabyte of the first checkpoint (the whole guest), and remus would count it as lost.
    env --default-signal=INT $ON_PRIMARY python3 $LAB_BUILD/bin/remus -i 200 --ack-timeout 60000 --stats-json "$STATS" \
        $KEYARGS domu 127.0.0.1 > $OUTD/$1-remus.log 2>&1 &
    REMUS=$!
    t_start=$(uptime_s)
}

fail_and_stop() {  # $1: result name; the rest: why
    _name=$1; shift
    result $_name FAIL "$*"
    kill -KILL $REMUS $RECEIVER 2>/dev/null
    echo "--- remus:"; cat $OUTD/$_name-remus.log
    echo "--- receiver:"; cat $OUTD/$_name-receiver.log
    xl list
    exit 1
}

# peer_failover: `xl remus` protects the running domu until its first checkpoint and MORE more,
# then its primary dies the same way as remus's (frozen, domain destroyed, SIGKILL).  True (and
# PEER_WHY empty) when xl remus's standby runs as the new domu and printed a line (the xl_* times
# then hold); otherwise false, PEER_WHY says why.  Prints no RESULT (peer_report does, once
# remus's times are in).
peer_failover() {
    PEER_WHY=
    PEER_OLD=$(xl domid domu)
    place_guest domu 0
    $ON_PRIMARY xl -vvv remus -F -n -i 200 -s '' domu "$XL_RUNE" > $OUTD/xl-remus-failover.log 2>&1 &
    XLREMUS=$!
    t_start=$(uptime_s)
    poll_until "$FIRST_TIMEOUT" xl_reach $((1 + MORE))
    peer_first=$(since "$t_start")
    peer_incoming_state=$(xl_state domu--incoming)
    if [ "$(xl_checkpoints)" -lt $((1 + MORE)) ] || gone $XLREMUS; then
        kill -INT $XLREMUS 2>/dev/null; wait $XLREMUS; _rc=$?
        PEER_WHY="xl remus made $(xl_checkpoints) checkpoints in ${peer_first}s (exit $_rc; see xl-remus-failover.log)"
        return 1
    fi
    peer_standby_pid=$(standby_xl)
    place_guest domu--incoming 1
    placement $XLREMUS $peer_standby_pid
    clock_exits xl-remus $XLREMUS "$peer_standby_pid"
    BALLAST_PID= BALLAST_SAID=
    if [ -n "$BALLAST" ]; then
        rm -f $OUTD/ballast.ready
        # ...holding a page of domu (its xenstore page), as the primary holds pages through libxc
        _mfn=$(xenstore-read /local/domain/$PEER_OLD/store/ring-ref 2>/dev/null)
        python3 "$REMUS_LAB_SRC/tests/xenlab/ballast.py" $OUTD/ballast.ready ${BALLAST%:*} ${BALLAST#*:} \
            ${_mfn:+$PEER_OLD $_mfn} &
        BALLAST_PID=$!
        poll 0.1 120 test -f $OUTD/ballast.ready
        _held=$(cat $OUTD/ballast.ready 2>/dev/null)
        BALLAST_SAID="; ballast ($BALLAST MiB, RSS $(rss_mib $BALLAST_PID) MiB, $_held) killed with its primary"
        kill -STOP $BALLAST_PID
    fi
    kill -STOP $XLREMUS
    xl destroy domu
    echo "domu destroyed, xl remus frozen: dying domains: $(dying_domains)"
    marks=$(console_marks)
    clock_line xl-remus "$marks"
    end_clocked kill $XLREMUS $BALLAST_PID
    t_kill=$T_KILL xl_unpaused_s=$UNPAUSED_S xl_primary_exit_s=$PRIMARY_EXIT_S
    wait $XLREMUS $BALLAST_PID 2>/dev/null
    poll_fast 120 runs_as_new "$PEER_OLD"
    xl_running_s=$(since "$t_kill")
    poll_fast 120 has_new_counters "$marks" 1
    xl_printing_s=$(line_s xl-remus)
    xl_phases "xl remus's standby" "$peer_standby_pid"
    cpu_window xl-remus
    poll_until 30 has_new_counters "$marks" 3
    xl list
    peer_counters=$(new_counters "$marks" | tr '\n' ' ')
    if ! runs_as_new "$PEER_OLD" || ! has_new_counters "$marks" 1; then
        PEER_WHY="xl remus's standby did not run as domu within 120 s of the SIGKILL (see xl-remus-failover.log)"
        return 1
    fi
    NEW_LOG=$(the_counter_log "$marks")
    [ -n "$NEW_LOG" ] && DOMU_CONSOLE=$NEW_LOG
    return 0
}
xl_checkpoints() { count_lines $OUTD/xl-remus-failover.log 'Checkpointed save'; }
xl_reach() { [ "$(xl_checkpoints)" -ge "$1" ] || gone $XLREMUS; }
# peer_report: xl_remus_failover's RESULT, with remus's times and the ratio remus/xl
peer_report() {
    if [ -z "$PEER_WHY" ]; then
        ratio=$(python3 -c 'import sys
r, x = map(float, sys.argv[1:4]), map(float, sys.argv[4:7])
print(*(round(a / b, 2) for a, b in zip(r, x)))' "$REMUS_UNPAUSED_S" "$REMUS_RUNNING_S" "$REMUS_PRINTING_S" \
            "$xl_unpaused_s" "$xl_running_s" "$xl_printing_s")
        result xl_remus_failover PASS "xl remus (domu--incoming $peer_incoming_state, $(xl_checkpoints)" \
            "checkpoints after ${peer_first}s): SIGKILL to unpaused (xl's exit) ${xl_unpaused_s}s, to running" \
            "(xl list) ${xl_running_s}s, to the guest's next line ${xl_printing_s}s (counter then:" \
            "$(echo $peer_counters | cut -d' ' -f1-3)); remus: ${REMUS_UNPAUSED_S}s, ${REMUS_RUNNING_S}s and" \
            "${REMUS_PRINTING_S}s; ratio remus/xl (unpaused, running, printing) = $ratio; the killed" \
            "primary exited after ${xl_primary_exit_s}s (remus's: ${REMUS_PRIMARY_EXIT_S}s); $ORDER_SAID$BALLAST_SAID$SPLIT_SAID"
    else
        result xl_remus_failover SKIP "$PEER_WHY; remus: ${REMUS_RUNNING_S:-nan}s / ${REMUS_PRINTING_S:-nan}s; $ORDER_SAID$BALLAST_SAID$SPLIT_SAID"
        grep -v -e '^xc: detail' -e 'libxl: debug' -e xencall $OUTD/xl-remus-failover.log | tail -8
    fi
}
# fresh_domu: a running domu again, after a failover that did not complete: the standby xl killed,
# what is left of domu and domu--incoming destroyed, domu created by lab_domu_up (it logs to
# guest-domu.log, which then is DOMU_CONSOLE again).
fresh_domu() {
    pkill -KILL -f "$STANDBY_XL_PATTERN"
    for _name in domu domu--incoming; do xl destroy $_name > /dev/null 2>&1; done
    DOMU_CONSOLE=/var/log/xen/console/guest-domu.log
    lab_domu_up
}

# ---------------------------------------------------------------------------------------------
OLD_DOMID=$(xl domid domu)
if has_part orderly; then
section "standby, then an orderly stop: remus-receiver --once, remus -i 200 domu 127.0.0.1, SIGINT"
start_protection standby_orderly
poll_until "$FIRST_TIMEOUT" commits_reach 2
both_run_with 2 || fail_and_stop standby_orderly "no 2 checkpoints ($(since "$t_start")s after remus started)"
poll_until 60 xl domid domu--incoming > /dev/null 2>&1
incoming_state=$(xl_state domu--incoming)
rss=$(rss_mib $RECEIVER)
kill -INT $REMUS
poll_until 120 gone $RECEIVER
gone $RECEIVER || fail_and_stop standby_orderly "the receiver did not end within 120 s of remus's SIGINT"
wait $REMUS; remus_rc=$?
wait $RECEIVER; rrc=$?
tail -3 $OUTD/standby_orderly-receiver.log
xl list
ok=0
[ "$rrc" = 0 ] || ok=1
case $incoming_state in --p---|--p*) ;; *) ok=1 ;; esac
[ "$(domains_named domu)" = 1 ] && [ "$(xl domid domu)" = "$OLD_DOMID" ] || ok=1
no_domain domu--incoming || ok=1
guest_runs || ok=1
check standby_orderly $ok "receiver exit $rrc, remus exit $remus_rc; domu--incoming was $incoming_state" \
    "during protection (receiver RSS ${rss} MiB); after the stop: $(domains_named domu) domu (id" \
    "$(xl domid domu 2>/dev/null), state $(domu_state)), domu--incoming: $(xl domid domu--incoming 2>/dev/null || echo none)"
fi

# ---------------------------------------------------------------------------------------------
if has_part receiver-killed; then
section "standby, then the receiver is SIGKILLed: its guard destroys the standby, no failover"
start_protection standby_receiver_killed
poll_until "$FIRST_TIMEOUT" commits_reach 2
both_run_with 2 || fail_and_stop standby_receiver_killed "no 2 checkpoints ($(since "$t_start")s after remus started)"
poll_until 60 xl domid domu--incoming > /dev/null 2>&1
incoming_state=$(xl_state domu--incoming)
t_kill=$(uptime_s)
kill -KILL $RECEIVER
wait $RECEIVER 2>/dev/null
poll_until 60 no_domain domu--incoming
destroyed_s=$(since "$t_kill")
# remus notices that its backup is gone (the connection closes) and keeps the guest running
poll_until 120 gone $REMUS
if gone $REMUS; then wait $REMUS; remus_rc=$?; else kill -INT $REMUS; wait $REMUS; remus_rc="still running (stopped by SIGINT, exit $?)"; fi
tail -2 $OUTD/standby_receiver_killed-remus.log
sleep 3  # a failover, had one started, would have made a second domu by now
xl list
ok=0
case $incoming_state in --p---|--p*) ;; *) ok=1 ;; esac
no_domain domu--incoming || ok=1
[ "$(domains_named domu)" = 1 ] && [ "$(xl domid domu)" = "$OLD_DOMID" ] || ok=1
guest_runs || ok=1
check standby_receiver_killed $ok "domu--incoming was $incoming_state; receiver SIGKILLed: standby gone" \
    "${destroyed_s}s later ($(xl domid domu--incoming 2>/dev/null || echo none) left); remus: $remus_rc;" \
    "$(domains_named domu) domu (id $(xl domid domu 2>/dev/null), state $(domu_state))"
fi

# ---------------------------------------------------------------------------------------------
has_part failover || exit $FAILS
ORDER_SAID="order: remus first, on a fresh guest"
if [ "$XL_FIRST" = 1 ] && has_part peer; then
    section "REMUS_LAB_XL_FIRST=1: the peer's failover first, then remus protects the guest xl remus failed over"
    ORDER_SAID="order: xl remus first, on a fresh guest (REMUS_LAB_XL_FIRST=1)"
    if ! peer_failover; then
        echo "$PEER_WHY; remus protects a freshly created domu instead"
        fresh_domu || fail_and_stop failover_xen "no fresh domu after xl remus's failover did not complete"
        ORDER_SAID="order: xl remus first (REMUS_LAB_XL_FIRST=1; its failover did not complete, remus's ran on a fresh guest)"
    fi
    OLD_DOMID=$(xl domid domu)
fi
section "failover to the standby: the primary dies after its first checkpoint and $MORE more"
start_protection failover_xen
poll_until "$FIRST_TIMEOUT" commits_reach 1
both_run_with 1 || fail_and_stop failover_xen "no first checkpoint ($(since "$t_start")s after remus started)"
first_s=$(since "$t_start")
echo "first checkpoint committed after ${first_s}s"
# A checkpoint suspended after this counter was read holds a counter at least this high, and
# checkpoint n0 + 2 is suspended only after n0 + 1 was acknowledged, which is after n0 is read.
mark=$(domu_counter)
n0=$(commits)
poll_until 300 commits_reach $((n0 + MORE))
both_run_with $((n0 + MORE)) || fail_and_stop failover_xen "no $MORE more checkpoints after the first"
incoming_state=$(xl_state domu--incoming)
incoming_mem=$(xl list domu--incoming 2>/dev/null | awk 'NR == 2 {print $3}')
rss=$(rss_mib $RECEIVER) hwm=$(hwm_mib $RECEIVER)
primary_rss=$(rss_mib $REMUS) primary_hwm=$(hwm_mib $REMUS)
# Where the primary's resident memory is, by mapping (its exit time grows with it): kept in OUTD.
# Anonymous mappings are told apart by size (malloc's thread arenas reserve 64 MiB each, the
# interpreter's small-object arenas are 1 MiB, large buffers get mappings of their own).
awk '/^[0-9a-f]+-[0-9a-f]+ / {name = $6} /^Size:/ {if (name == "") name = sprintf("[anon, %.1f MiB mappings]", $2 / 1024)}
     /^Rss:/ {kb[name] += $2; n[name]++}
     END {for (k in kb) if (kb[k] >= 1024) printf "%6.1f MiB %s x%d\n", kb[k] / 1024, k, n[k]}' \
    /proc/$REMUS/smaps 2>/dev/null | sort -rn > $OUTD/failover-primary-smaps.txt
guest_mib=$(xl list domu | awk 'NR == 2 {print $3}')
# the primary's death watch (remus.deathwatch): its helper, a child of the primary
watch=$(ps -o args= --ppid $REMUS 2>/dev/null | grep -c 'remus[.]deathwatch')
echo "counter $mark before checkpoint $((n0 + 2)); $(commits) checkpoints committed; domu--incoming" \
     "$incoming_state (${incoming_mem} MiB); receiver RSS ${rss} MiB (peak ${hwm}) for a ${guest_mib} MiB guest;" \
     "primary RSS ${primary_rss} MiB (peak ${primary_hwm}); death watch helpers: $watch"
standby_pid=$(standby_xl)
place_guest domu--incoming 1
placement $REMUS $RECEIVER $standby_pid
if [ "$VANISH" = 1 ]; then
    clock_exits remus "" "$standby_pid" $RECEIVER
else
    clock_exits remus $REMUS "$standby_pid" $RECEIVER
fi
kill -STOP $REMUS
[ "${REMUS_LAB_IDLE_DYING:-0}" = 1 ] && chrt --idle -a -p 0 $REMUS
xl destroy domu
echo "domu destroyed, remus frozen: dying domains: $(dying_domains)"
marks=$(console_marks)
clock_line remus "$marks"
if [ "$VANISH" = 1 ]; then
    end_clocked shut $REMUS $PORT
    [ -n "$T_KILL" ] || fail_and_stop failover_xen "could not shut remus's connection to port $PORT"
    echo "REMUS_LAB_VANISH: remus's connection was shut, remus stays frozen until the guest's next line;" \
         "the times below count from the shutdown, not from a SIGKILL"
else
    end_clocked kill $REMUS
fi
t_kill=$T_KILL t_kill_wall=$T_KILL_WALL unpaused_s=$UNPAUSED_S primary_exit_s=$PRIMARY_EXIT_S
[ "$VANISH" = 1 ] || wait $REMUS 2>/dev/null
poll_fast 120 runs_as_new "$OLD_DOMID"
running_s=$(since "$t_kill")
poll_fast 120 has_new_counters "$marks" 1
printing_s=$(line_s remus)
if [ "$VANISH" = 1 ]; then
    kill -KILL $REMUS
    wait $REMUS 2>/dev/null
fi
xl_phases "remus's standby" "$standby_pid"
cpu_window remus
# Only now (a python3 start takes a second under emulation): the same work as the peer's part
# stands between the kill and its guest's next line.
acked=$(python3 -c 'import json, sys
seqs = []
for line in open(sys.argv[1]):
    try:
        event = json.loads(line)
    except ValueError:  # a line cut by the SIGKILL
        continue
    if event.get("event") == "checkpoint":
        seqs.append(event["seq"])
print(max(seqs, default=0))' "$STATS")
poll_until "$RESTORE_TIMEOUT" gone $RECEIVER
gone $RECEIVER || fail_and_stop failover_xen "the receiver did not finish within ${RESTORE_TIMEOUT}s of the SIGKILL"
wait $RECEIVER
rrc=$?
cat $OUTD/failover_xen-receiver.log
xl list
activation_env "$EVENTS" "$t_kill_wall" > $OUTD/failover-activated.env
. $OUTD/failover-activated.env
said=$(grep -c "activated xen:domu from checkpoint $seq (.* old); it runs as domain $domid" \
       $OUTD/failover_xen-receiver.log)

poll_until 60 has_new_counters "$marks" 3
guest_runs; runs=$?
state=$(domu_state)
counters=$(new_counters "$marks" | tr '\n' ' ')
echo "counter before checkpoint $((n0 + 2)): $mark; printed since the failover: $counters"
verdict=$(python3 -c 'import sys
mark, seen = int(sys.argv[1]), [int(c) for c in sys.argv[2].split()]
if len(seen) < 3: print("fewer than 3 counter lines after the failover")
elif min(seen) <= mark: print(f"the counter went back to {min(seen)} (at most {mark}): a fresh boot?")
elif seen[-1] <= seen[0]: print("the counter does not advance")
else: print("ok")' "${mark:-0}" "$counters")
NEW_LOG=$(the_counter_log "$marks")
[ -n "$NEW_LOG" ] && DOMU_CONSOLE=$NEW_LOG

ok=0
[ "$rrc" = 0 ] || ok=1
[ "$said" = 1 ] || ok=1
[ "$standby" = yes ] || ok=1
case $incoming_state in --p---|--p*) ;; *) ok=1 ;; esac
[ "$seq" -ge "$acked" ] && [ "$seq" -le $((acked + 1)) ] || ok=1
[ "$(xl domid domu 2>/dev/null)" = "$domid" ] && [ "$domid" != "$OLD_DOMID" ] || ok=1
no_domain domu--incoming || ok=1
[ $runs = 0 ] || ok=1
[ "$verdict" = ok ] || ok=1
check failover_xen $ok "receiver exit $rrc; standby domu--incoming $incoming_state during protection;" \
    "activated checkpoint $seq (the last ack remus saw: $acked; $age_s s old; standby: $standby) as domain" \
    "$domid (was $OLD_DOMID), state $state; SIGKILL to unpaused (xl's exit) ${unpaused_s}s, to running" \
    "(xl list) ${running_s}s, to the guest's next line" \
    "${printing_s}s (activate() ${restore_s}s: $parts); counter $mark before checkpoint $((n0 + 2)), then" \
    "$(echo $counters | cut -d' ' -f1-4) ... ($verdict); first checkpoint after ${first_s}s;" \
    "receiver RSS ${rss} MiB (peak ${hwm}) for a ${guest_mib} MiB guest; primary RSS ${primary_rss} MiB" \
    "(peak ${primary_hwm}), exited ${primary_exit_s}s after the SIGKILL; the receiver exited after" \
    "$(receiver_exit_s remus)s"
REMUS_RUNNING_S=$running_s REMUS_PRINTING_S=$printing_s REMUS_UNPAUSED_S=$unpaused_s
REMUS_PRIMARY_EXIT_S=$primary_exit_s

# ---------------------------------------------------------------------------------------------
section "the peer: xl remus -F -n -i 200 -s '' domu 'xl migrate-receive -r', killed the same way"
if ! has_part peer; then
    :
elif [ "$XL_FIRST" = 1 ]; then
    peer_report  # its failover ran before remus's
elif [ $runs = 0 ]; then
    peer_failover
    peer_report
else
    result xl_remus_failover SKIP "remus's failed-over guest does not run"
fi

# A fresh domu (logging to guest-domu.log) for the jobs after this one; no standby xl left behind
# (one of `xl remus` that did not complete stays, and a later run would clock it).
fresh_domu || result failover_cleanup FAIL "a fresh domu did not come up"
if [ "$SPLIT" = 1 ]; then  # the jobs after this one run unplaced
    xl vcpu-pin Domain-0 all all; xl vcpu-pin domu all all
fi
exit $FAILS

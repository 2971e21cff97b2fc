#!/bin/sh
# Lab job (runs in dom0): failover of the lab's PV guest to a remus-receiver on the same host.
#
#   failover_build  the project and its cffi binding build in dom0, the guest runs
#   failover_xen    remus-receiver --once, then remus -i 200 domu 127.0.0.1 until its first
#                   checkpoint (the live copy of the whole guest) and REMUS_LAB_FAILOVER_MORE (3)
#                   more acknowledged ones; then the primary dies: remus is frozen (SIGSTOP), the
#                   domain destroyed, remus SIGKILLed.  The receiver must activate domu from its
#                   last acknowledged checkpoint and say so in one line (exit 0); the new domu
#                   runs (r or b) under its new id; its console counter goes on from where the
#                   primary's was (every value it prints is above the last one printed before
#                   the last acknowledged checkpoint, so no fresh boot) and keeps advancing.
#                   Measured: SIGKILL to activation, the restore alone, SIGKILL to the guest's
#                   next console line.
#
# Why freeze, destroy, then kill: on one host the backup can take the name domu only once the
# primary's domain is gone (XENLAB.md), and a remus left running would see its domain die and
# end its session before `xl destroy` had released the name.  Frozen, it sends nothing; the
# SIGKILL then closes its connection, which the receiver sees at once as the primary's death
# (a heartbeat timeout of 60 s keeps the frozen seconds from counting as one).
# The restored domu stays for the jobs after this one (it is destroyed if it does not run).
. "$REMUS_LAB_SRC/tests/xenlab/dom0-lib.sh"
FIRST_TIMEOUT=${REMUS_LAB_FIRST_TIMEOUT:-600}
MORE=${REMUS_LAB_FAILOVER_MORE:-3}
RESTORE_TIMEOUT=${REMUS_LAB_RESTORE_TIMEOUT:-900}
OUTD=$REMUS_LAB_OUT
EVENTS=$OUTD/failover-events.jsonl
STATS=$OUTD/failover-stats.jsonl

section "build remus and its Xen binding in dom0; the lab's PV guest"
lab_install_remus && lab_domu_up
check failover_build $? "domu id $(xl domid domu 2>/dev/null), counter $(domu_counter), state $(domu_state)"
[ "$FAILS" = 0 ] || exit 1
OLD_DOMID=$(xl domid domu)

# commits: how many checkpoints the receiver has committed (and acknowledged) so far
commits() { count_lines "$EVENTS" '"event": "commit"'; }
# wait_for SECONDS COMMAND...: poll COMMAND every half second; false if it never held
wait_for() {
    _until=$(( $(cut -d. -f1 /proc/uptime) + $1 )); shift
    until "$@"; do
        [ "$(cut -d. -f1 /proc/uptime)" -lt "$_until" ] || return 1
        sleep 0.5
    done
}
gone() { ! kill -0 "$1" 2>/dev/null; }
# commits_reach N: N checkpoints committed, or no point waiting (remus or the receiver ended)
commits_reach() { [ "$(commits)" -ge "$1" ] || gone $REMUS || gone $RECEIVER; }
# both_run_with N: N checkpoints committed and both still running
both_run_with() { [ "$(commits)" -ge "$1" ] && ! gone $REMUS && ! gone $RECEIVER; }

section "remus-receiver --once, then remus -i 200 domu 127.0.0.1"
rm -f "$EVENTS" "$STATS"
python3 $LAB_BUILD/bin/remus-receiver --once --listen 127.0.0.1 --heartbeat-timeout 60000 \
    --events-json "$EVENTS" > $OUTD/failover-receiver.log 2>&1 &
RECEIVER=$!
sleep 2
# Background jobs of a non-interactive sh ignore SIGINT: give remus the default back.
# --ack-timeout: under emulation the receiver can take longer than the default 5 s to take in
# a megabyte of the first checkpoint (the whole guest), and remus would count it as lost.
env --default-signal=INT python3 $LAB_BUILD/bin/remus -i 200 --ack-timeout 60000 --stats-json "$STATS" \
    domu 127.0.0.1 > $OUTD/failover-remus.log 2>&1 &
REMUS=$!
t_start=$(uptime_s)

fail_and_stop() {
    result failover_xen FAIL "$*"
    kill -KILL $REMUS $RECEIVER 2>/dev/null
    echo "--- remus:"; cat $OUTD/failover-remus.log
    echo "--- receiver:"; cat $OUTD/failover-receiver.log
    exit 1
}

wait_for "$FIRST_TIMEOUT" commits_reach 1
both_run_with 1 || fail_and_stop "no first checkpoint ($(since "$t_start")s after remus started)"
first_s=$(since "$t_start")
echo "first checkpoint committed after ${first_s}s"
# A checkpoint suspended after this counter was read holds a counter at least this high, and
# checkpoint n0 + 2 is suspended only after n0 + 1 was acknowledged, which is after n0 is read.
mark=$(domu_counter)
n0=$(commits)
wait_for 300 commits_reach $((n0 + MORE))
both_run_with $((n0 + MORE)) || fail_and_stop "no $MORE more checkpoints after the first"
echo "counter $mark before checkpoint $((n0 + 2)); $(commits) checkpoints committed; the primary dies now"

kill -STOP $REMUS
xl destroy domu
lines_before=$(grep -c '' $DOMU_CONSOLE)  # not wc -l: its AVX2 path dies of SIGILL in this dom0
t_kill=$(uptime_s)
kill -KILL $REMUS
wait $REMUS 2>/dev/null
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

wait_for "$RESTORE_TIMEOUT" gone $RECEIVER
activated_s=$(since "$t_kill")
gone $RECEIVER || fail_and_stop "the receiver did not finish within ${RESTORE_TIMEOUT}s of the SIGKILL"
wait $RECEIVER
rrc=$?
cat $OUTD/failover-receiver.log
xl list
python3 - "$EVENTS" > $OUTD/failover-activated.env <<'EOF'
import json, sys
events = [e for e in map(json.loads, open(sys.argv[1])) if e.get("event") == "activated"]
e = events[-1] if events else {}
print(f"seq={e.get('seq', 0)} domid={e.get('domid', -1)} restore_s={e.get('restore_s', 0)} "
      f"age_s={round(e.get('age_s', 0), 2)}")
EOF
. $OUTD/failover-activated.env
said=$(grep -c "activated xen:domu from checkpoint $seq (.* old); it runs as domain $domid" \
       $OUTD/failover-receiver.log)

# The restored guest: running, under the name domu, printing its counter again.
new_lines() { tail -n +$((lines_before + 1)) $DOMU_CONSOLE | sed -n 's/.*domU counter \([0-9]*\).*/\1/p'; }
has_new_lines() { [ "$(new_lines | grep -c '')" -ge "$1" ]; }
wait_for 120 has_new_lines 1
printing_s=$(since "$t_kill")
wait_for 60 has_new_lines 3
guest_runs; runs=$?
state=$(domu_state)
counters=$(new_lines | tr '\n' ' ')
echo "counter before checkpoint $((n0 + 2)): $mark; printed since the failover: $counters"
verdict=$(python3 -c 'import sys
mark, seen = int(sys.argv[1]), [int(c) for c in sys.argv[2].split()]
if len(seen) < 3: print("fewer than 3 counter lines after the failover")
elif min(seen) <= mark: print(f"the counter went back to {min(seen)} (at most {mark}): a fresh boot?")
elif seen[-1] <= seen[0]: print("the counter does not advance")
else: print("ok")' "${mark:-0}" "$counters")

ok=0
[ "$rrc" = 0 ] || ok=1
[ "$said" = 1 ] || ok=1
[ "$seq" -ge "$acked" ] && [ "$seq" -le $((acked + 1)) ] || ok=1
[ "$(xl domid domu 2>/dev/null)" = "$domid" ] && [ "$domid" != "$OLD_DOMID" ] || ok=1
[ $runs = 0 ] || ok=1
[ "$verdict" = ok ] || ok=1
check failover_xen $ok "receiver exit $rrc; activated checkpoint $seq (the last ack remus saw: $acked;" \
    "$age_s s old) as domain $domid (was $OLD_DOMID), state $state; failover ${activated_s}s from" \
    "SIGKILL (restore ${restore_s}s), guest printing again ${printing_s}s after it; counter $mark" \
    "before checkpoint $((n0 + 2)), then $(echo $counters | cut -d' ' -f1-4) ... ($verdict);" \
    "first checkpoint after ${first_s}s"
if [ $runs != 0 ] && xl domid domu > /dev/null 2>&1; then
    xl destroy domu  # the next job creates a fresh one
fi
exit $FAILS

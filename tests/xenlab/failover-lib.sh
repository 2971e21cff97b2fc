# Helpers for the failover jobs (jobs/failover-xen.sh, campaigns/failover-two-hosts.sh), sourced
# in dom0 after dom0-lib.sh, by jobs that set OUTD (their results), CONSOLES (the console logs a
# failed-over guest may write to) and CPU / CPU_SNAPS (REMUS_LAB_CPU; CPU=0 if unset).
# They time a failover on the clock of the dom0 they run in: clock_exits and clock_line start
# watchers before the kill, and after_kill reads what they wrote as seconds after T_KILL.
CPU=${CPU:-0}
# cpu_window TAG: with REMUS_LAB_CPU=1, what used dom0's CPUs from the kill to the standby xl's
# exit, from the snapshots end_clocked and clock_exits' waiter took (EXITCLOCK_SNAPSHOT), and
# which python3 each pid is (of those still running)
cpu_window() {
    [ "$CPU" = 1 ] || return 0
    echo "from the kill to the standby xl's exit ($1): $(python3 $REMUS_LAB_SRC/tests/xenlab/cpuwindow.py \
        "$CPU_SNAPS-$1-before" "$CPU_SNAPS-$1-after" 2>&1)"
    echo "  python3 now: $(ps -o pid=,args= -C python3 | cut -c1-90 | sed 's/^ *//' | tr '\n' ';')"
}
# xl_trace_setup: RX_PATH (the receiver's PATH) and XL_RUNE (`xl remus`'s receiving command): xl
# itself, or with REMUS_LAB_XL_TRACE=1 a wrapper named xl first on the PATH that runs
# `xl migrate-receive` through xltrace.py (XL_TRACE: where the stamped logs go; empty without).
xl_trace_setup() {
    RX_PATH=$PATH XL_RUNE='xl migrate-receive -r' XL_TRACE=
    [ "${REMUS_LAB_XL_TRACE:-0}" = 1 ] || return 0
    XL_TRACE=/tmp/remus-xl-trace  # dom0's disk, not the results mount: xl -vvv says a lot
    mkdir -p $XL_TRACE/bin
    printf '#!/bin/sh\ncase "$1" in migrate-receive) exec python3 %s exec %s %s "$@" ;; esac\nexec %s "$@"\n' \
        "$REMUS_LAB_SRC/tests/xenlab/xltrace.py" $XL_TRACE "$(command -v xl)" "$(command -v xl)" > $XL_TRACE/bin/xl
    chmod +x $XL_TRACE/bin/xl
    RX_PATH=$XL_TRACE/bin:$PATH XL_RUNE="$XL_TRACE/bin/xl migrate-receive -r"
}
# xl_phases TAG XL_PID: with REMUS_LAB_XL_TRACE=1, where xl's failover went after the kill
xl_phases() {
    [ -n "$XL_TRACE" ] && [ -n "$2" ] || return 0
    echo "xl's failover ($1), after the kill: $(python3 $REMUS_LAB_SRC/tests/xenlab/xltrace.py phases \
        "$T_KILL" $XL_TRACE/xl-$2.log 2>&1)"
    mkdir -p $OUTD/xl-trace && cp $XL_TRACE/xl-$2.log $OUTD/xl-trace/ 2>/dev/null
}
# activation_env EVENTS T_KILL_WALL: the receiver's last activation, as shell assignments (seq,
# domid, restore_s, age_s, standby, and parts: the loss seen after the kill, then activate()'s
# own parts, from remus.xen.standby), for the job to source
activation_env() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
events = [e for e in map(json.loads, open(sys.argv[1])) if e.get("event") == "activated"]
e = events[-1] if events else {}
# From the SIGKILL to activate() (the loss seen), then activate()'s own parts (remus.xen.standby).
seen_s = round(e.get("time", 0) - e.get("activate_s", 0) - float(sys.argv[2]), 2) if e else 0
print(f"seq={e.get('seq', 0)} domid={e.get('domid', -1)} restore_s={e.get('restore_s', 0)} "
      f"age_s={round(e.get('age_s', 0), 2)} standby={'yes' if e.get('standby') else 'no'} "
      f"parts='loss seen {seen_s}s, backlog {e.get('backlog_pages', '?')} pages written in "
      f"{e.get('drain_s', '?')}s, end of stream at {e.get('end_of_stream_s', '?')}s, "
      f"xl {e.get('xl_s', '?')}s'")
EOF
}
rss_mib() { awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' /proc/$1/status 2>/dev/null; }
hwm_mib() { awk '/^VmHWM/ {printf "%.0f", $2 / 1024}' /proc/$1/status 2>/dev/null; }
# console_marks: the line count of each console log (new lines are those beyond it)
console_marks() { for f in $CONSOLES; do grep -c '' "$f" 2>/dev/null || echo 0; done | tr '\n' ' '; }
# new_counters MARKS: counter values printed beyond MARKS in either log, in order of arrival
new_counters() {
    set -- $1
    for f in $CONSOLES; do
        tail -n +$(( ${1:-0} + 1 )) "$f" 2>/dev/null | sed -n 's/.*domU counter \([0-9]*\).*/\1/p'
        shift
    done
}
has_new_counters() { [ "$(new_counters "$1" | grep -c '')" -ge "$2" ]; }
# the_counter_log MARKS: the log the new domain writes to (it becomes DOMU_CONSOLE)
the_counter_log() {
    set -- $1
    for f in $CONSOLES; do
        [ "$(tail -n +$(( ${1:-0} + 1 )) "$f" 2>/dev/null | grep -c 'domU counter')" -gt 0 ] && echo "$f"
        shift
    done | tail -1
}
# clock_exits TAG PRIMARY XLRECV [RECEIVER]: from now on, note without polling when each of these
# exits (xl migrate-receive exits right after it unpauses the failed-over domain: the "unpaused"
# moment).  Started before the primary is frozen, so that the frozen window stays as short as
# before; shell polling for these lagged by up to a second while dom0 was busy with the failover
# (tests/xenlab/exitclock.py).  With REMUS_LAB_CPU=1 it also sets CLOCK_SNAP, where end_clocked and
# the standby xl's waiter put their snapshots of /proc (cpu_window TAG reads them).
clock_exits() {
    _clock="python3 $REMUS_LAB_SRC/tests/xenlab/exitclock.py" CLOCKED=$OUTD/$1 CLOCK_PIDS= CLOCK_SNAP=
    if [ "$CPU" = 1 ]; then CLOCK_SNAP=$CPU_SNAPS-$1; rm -f "$CLOCK_SNAP"-before "$CLOCK_SNAP"-after; fi
    rm -f "$CLOCKED"-*-exit "$CLOCKED"-*-exit.ready
    for _which in primary:$2 standby-xl:$3 receiver:$4; do
        [ -n "${_which#*:}" ] || continue
        _snap=
        [ -n "$CLOCK_SNAP" ] && [ "${_which%%:*}" = standby-xl ] && _snap=$CLOCK_SNAP-after
        EXITCLOCK_SNAPSHOT=$_snap $_clock wait "${_which#*:}" "$CLOCKED-${_which%%:*}-exit" &
        [ "${_which%%:*}" = receiver ] || CLOCK_PIDS="$CLOCK_PIDS $!"
        poll 0.1 60 test -f "$CLOCKED-${_which%%:*}-exit.ready"
    done
}
# clock_line TAG MARKS: from now on, note without a shell loop when the guest's next counter line
# appears beyond MARKS in either console log; started before the kill, like clock_exits, and read
# with line_s TAG once has_new_counters saw the line.
clock_line() {
    _f=$OUTD/$1-next-line _specs=
    rm -f "$_f" "$_f.ready"
    set -- $2
    for _log in $CONSOLES; do
        _specs="$_specs $_log:${1:-0}"
        [ $# -gt 0 ] && shift
    done
    python3 "$REMUS_LAB_SRC/tests/xenlab/exitclock.py" line "$_f" 'domU counter [0-9]' $_specs &
    LINE_PID=$!
    poll 0.1 60 test -f "$_f.ready"
}
line_s() { wait $LINE_PID; after_kill "$OUTD/$1-next-line"; }
after_kill() { [ -s "$1" ] && awk -v k="$T_KILL" '{printf "%.2f", $1 - k}' "$1" || echo nan; }
receiver_exit_s() { after_kill "$OUTD/$1-receiver-exit"; }
# the standby's xl migrate-receive -r (the newest: a standby of `xl remus` that never completed
# can outlive its part; anchored, since `xl remus ... domu 'xl migrate-receive -r'` carries the same
# words in its own command line)
STANDBY_XL_PATTERN='^[^ ]*xl (-vvv )?migrate-receive -r'
standby_xl() { pgrep -n -f "$STANDBY_XL_PATTERN"; }
# runs_as_new DOMID: domu exists under another id than DOMID and runs (r or b)
runs_as_new() {
    _id=$(xl domid domu 2>/dev/null)
    [ -n "$_id" ] && [ "$_id" != "$1" ] && case $(domu_state) in r-----|-b----) true ;; *) false ;; esac
}


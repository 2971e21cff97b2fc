# Helpers for lab jobs, sourced inside dom0:  . "$REMUS_LAB_SRC/tests/xenlab/dom0-lib.sh"
#
#   result NAME PASS|FAIL|SKIP DETAIL...   print a RESULT line (and count failures in $FAILS)
#   check NAME RC DETAIL...                PASS if RC is 0, else FAIL
#   lab_install_remus                      build the project (and its cffi Xen binding) once
#                                          per boot in /tmp/remus and cd there; see `remus`
#   lab_domu_up                            the lab's PV guest "domu" running, counter ticking
#   lab_xl_create NAME CFG [OPTION...]     `xl create -q` a guest, retried (see below)
#   domu_counter / domu_state              its last console counter; its `xl list` state
#   guest_runs                             domu runs (r or b, never s or p) over a few looks
#   lab_resume DOMID                       resume a guest left suspended, with remus's own code
#   xl_state NAME                          a domain's `xl list` state column (domu_state: domu's)
#   count_lines FILE PATTERN               how many lines of FILE match so far (0 if none, or no FILE)
#   since T0                               seconds since dom0 uptime T0, one decimal
#   section TITLE                          a header in the job log
# Every helper is idempotent, so jobs run alone (run-job.sh) or together (jobs/suite.sh).

FAILS=${FAILS:-0}
REMUS_LAB_SRC=${REMUS_LAB_SRC:-/mnt/remus}
REMUS_LAB_OUT=${REMUS_LAB_OUT:-/tmp}
LAB_BUILD=/tmp/remus
DOMU_CFG=/var/lib/remus-lab/domu.cfg
DOMU_CONSOLE=/var/log/xen/console/guest-domu.log

uptime_s() { cut -d' ' -f1 /proc/uptime; }
since() { awk "BEGIN {printf \"%.1f\", $(uptime_s) - $1}"; }
count_lines() { _n=$(grep -c "$2" "$1" 2>/dev/null); echo "${_n:-0}"; }
section() { echo; echo "=== $* (dom0 uptime $(uptime_s) s)"; }
# gone PID: the process we started has ended
gone() { ! kill -0 "$1" 2>/dev/null; }
# poll EVERY SECONDS COMMAND...: run COMMAND every EVERY seconds until it holds; false if it never
# did within SECONDS
poll() {
    _every=$1 _until=$(( $(cut -d. -f1 /proc/uptime) + $2 )); shift 2
    until "$@"; do
        [ "$(cut -d. -f1 /proc/uptime)" -lt "$_until" ] || return 1
        sleep "$_every"
    done
}
poll_until() { poll 0.5 "$@"; }  # poll_until SECONDS COMMAND...
poll_fast() { poll 0.1 "$@"; }   # poll_fast SECONDS COMMAND... (for timings)
# commits: how many checkpoints the receiver has committed so far (its --events-json is $EVENTS)
commits() { count_lines "$EVENTS" '"event": "commit"'; }

result() {
    _name=$1 _status=$2; shift 2
    echo "RESULT $_name $_status $*"
    [ "$_status" = FAIL ] && FAILS=$((FAILS + 1))
    return 0
}

check() {
    _name=$1 _rc=$2; shift 2
    if [ "$_rc" = 0 ]; then result "$_name" PASS "$@"; else result "$_name" FAIL "$@"; fi
}

lab_install_remus() {
    # The checkout is read-only; copy it, build the binding against dom0's libxen-dev and
    # Python (the compiled module must match dom0's Xen release) and the codec's C helper,
    # run it from there.
    if [ ! -f $LAB_BUILD/.built ]; then
        rm -rf $LAB_BUILD; mkdir -p $LAB_BUILD
        tar -C "$REMUS_LAB_SRC" --exclude=.git --exclude='.venv*' --exclude=build \
            --exclude='*.egg-info' --exclude=__pycache__ --exclude='*.so' --exclude='*.o' \
            --exclude=.pytest_cache --exclude=.mypy_cache -cf - . | tar -C $LAB_BUILD -xf - || return 1
        # -O0: the binding is thin call wrappers, and gcc at -O2 under TCG takes twice as long.
        (cd $LAB_BUILD && CFLAGS=-O0 python3 setup.py -q build_ext --inplace) \
            > "$REMUS_LAB_OUT/remus-build.log" 2>&1 \
            || { tail -20 "$REMUS_LAB_OUT/remus-build.log"; return 1; }
        touch $LAB_BUILD/.built
    fi
    export PYTHONPATH=$LAB_BUILD
    # Not the read-only checkout: `python3 -c`/`-m` would import remus from the cwd first,
    # and the checkout has no binding built for dom0.
    cd $LAB_BUILD
    return 0
}

remus() { python3 $LAB_BUILD/bin/remus "$@"; }

lab_resume() {  # after lab_install_remus
    python3 -c 'import sys
from remus.xen import lib
from remus.xen.control import XenControl
from remus.xen.store import XenStore
b = lib.load(); domid = int(sys.argv[1])
XenControl(b).resume_fast(domid); XenStore(b).resume_domain(domid)' "$1"
}

domu_counter() {
    sed -n 's/.*domU counter \([0-9]*\).*/\1/p' $DOMU_CONSOLE 2>/dev/null | tail -1
}

xl_state() {  # the state column of `xl list NAME` (r-----, -b----, ---ss-, ...)
    xl list "$1" 2>/dev/null | awk 'NR == 2 {print $5}'
}

domu_state() { xl_state domu; }

# lab_xl_create NAME CFG [OPTION...]: `xl create -q OPTION... CFG` for the guest NAME, three tries.
# libxl gives xenconsoled 10 s to publish a new guest's console tty and otherwise destroys the
# guest; early in a TCG boot xenconsoled once took 12.5 s. A failed try is reported, its leftovers
# destroyed, and the create tried again.
lab_xl_create() {
    _name=$1 _cfg=$2 _try=1; shift 2
    until xl create -q "$@" "$_cfg"; do
        echo "xl create $_name: try $_try of 3 failed (dom0 uptime $(uptime_s) s)"
        xl destroy "$_name" 2>/dev/null
        [ $_try -lt 3 ] || return 1
        _try=$((_try + 1))
    done
}

# lab_domu_up: domu running and printing its counter in DOMU_CONSOLE; a domu it creates counts as
# up only once it printed a line of its own (xenconsoled appends: an older domu's lines stay there).
lab_domu_up() {
    _seen=0
    if ! xl domid domu > /dev/null 2>&1; then
        _seen=$(count_lines $DOMU_CONSOLE 'domU counter')
        lab_xl_create domu $DOMU_CFG || return 1
    fi
    _i=0
    while [ $_i -lt 120 ]; do
        [ "$(count_lines $DOMU_CONSOLE 'domU counter')" -gt "$_seen" ] && return 0
        sleep 1; _i=$((_i + 1))
    done
    return 1
}

guest_runs() {
    # True if domu is running: over five looks half a second apart, `xl list` shows it running
    # (r) or blocked (b) at least once, and never suspended (s), paused (p), shut down or dying.
    # ("------", runnable but waiting for a CPU, is common on a loaded TCG host.)
    _seen_rb=1 _i=0
    while [ $_i -lt 5 ]; do
        case $(domu_state) in
            r-----|-b----) _seen_rb=0 ;;
            ------) ;;
            *) return 1 ;;
        esac
        sleep 0.5; _i=$((_i + 1))
    done
    return $_seen_rb
}

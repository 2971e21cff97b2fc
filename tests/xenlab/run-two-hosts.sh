#!/bin/bash
# Boot two labs at once, linked, and run one job in both dom0s: a primary host and a backup host.
#
#   bash tests/xenlab/run-two-hosts.sh DOM0_SCRIPT [-t TIMEOUT_S]
#
# Each lab is run-job.sh's, with one vCPU (so dom0 has one too) and, on a machine with two CPUs
# or more, pinned to a CPU of its own (taskset): the primary on CPU 0, the backup on CPU 1, so
# that neither host's work takes the other's CPU.  Their NICs are joined by a QEMU socket link
# over this machine's loopback, which nothing else is on.  DOM0_SCRIPT runs in both, as
# run-job.sh runs it, with REMUS_LAB_ROLE (primary or backup), REMUS_LAB_SELF_IP and
# REMUS_LAB_PEER_IP (10.250.0.1 the primary, 10.250.0.2 the backup; the script gives its NIC its
# address) besides the caller's REMUS_LAB_* knobs.  Both runs' output streams here, each line
# marked with its host.  Results: RESULTS/DATE-two-hosts-XXXX/{primary,backup} (links to the two
# runs), and `latest` points there.  The exit status is the backup's job's (the backup is where
# the failover happens and where the job reports), or the primary's when only that one failed.
set -euo pipefail
. "$(dirname "$0")/common.sh"

job_args 3600 "$@"

mkdir -p "$RESULTS"
PAIR=$(mktemp -d "$RESULTS/$(date +%Y%m%d-%H%M%S)-two-hosts-XXXX")
# A loopback port nobody listens on now (QEMU listens on it from the backup's start).
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PIN_PRIMARY=() PIN_BACKUP=()
if [ "$(nproc)" -ge 2 ]; then PIN_PRIMARY=(taskset -c 0) PIN_BACKUP=(taskset -c 1); fi

# host ROLE SELF PEER MAC LINK PIN...: one lab, in the background; its output marked with ROLE
host() {
    local role=$1 self=$2 peer=$3 mac=$4 link=$5; shift 5
    XENLAB_SMP=1 XENLAB_LINK=$link XENLAB_MAC=$mac \
        REMUS_LAB_ROLE=$role REMUS_LAB_SELF_IP=$self REMUS_LAB_PEER_IP=$peer \
        "$@" bash "$XENLAB_DIR/run-job.sh" "$JOB" -t "$TIMEOUT_S" \
        > >(tee "$PAIR/$role.out" | sed -u "s/^/[$role] /") 2>&1 &
}
host backup 10.250.0.2 10.250.0.1 52:54:00:00:00:02 "listen=127.0.0.1:$PORT" "${PIN_BACKUP[@]}"
BACKUP=$!
i=0
until ss -Hltn "sport = :$PORT" | grep -q .; do
    i=$((i + 1))
    if [ $i -gt 300 ] || ! kill -0 $BACKUP 2>/dev/null; then
        lab_log "the backup's QEMU never listened on 127.0.0.1:$PORT"
        kill $BACKUP 2>/dev/null; wait $BACKUP; exit 125
    fi
    sleep 0.1
done
host primary 10.250.0.1 10.250.0.2 52:54:00:00:00:01 "connect=127.0.0.1:$PORT" "${PIN_PRIMARY[@]}"
PRIMARY=$!
set +e
wait $BACKUP; brc=$?
wait $PRIMARY; prc=$?
set -e
for role in primary backup; do
    run=$(sed -n 's/^results: //p' "$PAIR/$role.out" | tail -1)
    [ -z "$run" ] || ln -sfn "$run" "$PAIR/$role"
done
ln -sfn "$PAIR" "$RESULTS/latest"
lab_log "two hosts done: backup's job exit $brc, primary's $prc"
echo "results: $PAIR"
[ "$brc" != 0 ] && exit "$brc"
exit "$prc"

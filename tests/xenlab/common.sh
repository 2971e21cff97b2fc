# Settings shared by the host-side lab scripts (build.sh, run-job.sh, run-two-hosts.sh,
# ci.sh).  Sourced, not run.
#
# Everything the lab builds lives under $LAB_HOME (default /var/tmp/remus-xenlab):
#   out/        images and the stamps of finished build stages
#   results/    one directory per run-job.sh run (logs copied back from dom0), and `latest`
# LAB_SKIP (exit status 3 of build.sh) means "the lab cannot be built here for a reason
# outside the project" (no root, a package gone from the mirror, no network): callers report
# the lab tests as skipped with the reason written to $OUT/build-skip-reason.

LAB_HOME=${REMUS_XENLAB_HOME:-/var/tmp/remus-xenlab}
OUT=$LAB_HOME/out
RESULTS=$LAB_HOME/results
LAB_LOCK=$LAB_HOME/lab.lock
LAB_SKIP=3
XENLAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$XENLAB_DIR/../.." && pwd)

lab_log() { echo "[xenlab $(date +%T)] $*" >&2; }

# job_args DEFAULT_TIMEOUT_S ARG...: a lab runner's "DOM0_SCRIPT [-t TIMEOUT_S]" into JOB and
# TIMEOUT_S.  -h prints the calling script's header comment; anything else wrong prints its
# usage line (the header's "#   bash ..." line) and exits 2.
job_args() {
    TIMEOUT_S=$1; shift
    JOB=
    while [ $# -gt 0 ]; do
        case $1 in
            -t) [ $# -ge 2 ] || _job_usage; TIMEOUT_S=$2; shift 2 ;;
            -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
            -*) _job_usage ;;
            *) [ -z "$JOB" ] || _job_usage; JOB=$1; shift ;;
        esac
    done
    [ -n "$JOB" ] && [ -f "$JOB" ] || _job_usage
}
_job_usage() { grep -m1 '^#   bash ' "$0" >&2; exit 2; }

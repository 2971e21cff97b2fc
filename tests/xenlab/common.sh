# Settings shared by the host-side lab scripts (build.sh, run-job.sh, ci.sh).  Sourced, not run.
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

#!/usr/bin/env bash
# Stop the cluster started by pg-start.sh (same PGPORT/PGDATA/PGBIN defaults).
#   PG_WIPE=1  also delete the data directory and its run directory (socket, logs)
set -euo pipefail
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" pg-stop   # PGPORT PGDATA PGBIN RUNDIR, as_pg

if [ -s "$PGDATA/PG_VERSION" ] && [ -x "$PGBIN/pg_ctl" ] \
   && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
  # fast = roll back open transactions and disconnect clients (walsenders too).
  as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >&2
else
  note "not running ($PGDATA)"
fi
if [ "${PG_WIPE:-0}" = 1 ]; then
  rm -rf -- "$PGDATA"
  rm -f -- "$RUNDIR/postgres.log" "$RUNDIR/initdb.log"
  rmdir -- "$RUNDIR" 2>/dev/null || true
fi

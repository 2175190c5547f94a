# shellcheck shell=bash
# Helpers shared by every script under scripts/, sourced first thing:
#
#   scripts/*.sh and scripts/lib/*.sh:  . "$ROOT/scripts/lib/common.sh"
#   scripts/services/*.sh: through scripts/services/lib.sh, which adds
#                          what only the service scripts need
#
# Messages go to stderr, so that stdout keeps only what callers read (the
# service start scripts print their URL as the last line of stdout).
#
#   LOG_PREFIX             set by the caller before sourcing: test.sh, bench, pg-start, ...
#   LOG_ERROR              what die puts between the prefix and the message;
#                          default "error: ", the service scripts set it empty
#   note MSG...            "PREFIX: MSG"
#   die MSG...             "PREFIX: error: MSG", then exit 1
#   section MSG...         "==> MSG  [+Ns]", N = seconds since this file was sourced
#   port_open PORT         something accepts connections on 127.0.0.1:PORT
#   live_pid PIDFILE       prints the PID in PIDFILE if that process is alive;
#                          false if the file is missing, empty or names no live process
#   wait_until TRIES STEP CMD...   runs CMD up to TRIES times, STEP seconds
#                          apart, and once more; false if it never succeeded
#   wait_gone PID TRIES STEP   polls `kill -0` up to TRIES times, STEP seconds
#                          apart; false if PID is still alive after that
#   terminate_pid PID TRIES STEP KILL_NOTE   SIGTERM, wait_gone, and if PID is
#                          still alive, note KILL_NOTE and SIGKILL it
#
# None of these call a procps tool (scripts must work without procps).

# Sourced once per shell: a lib file sources it again after its caller did,
# and must neither reset the start time nor redefine what the caller chose
# to override.
[ -z "${EVICTD_COMMON_SH:-}" ] || return 0
EVICTD_COMMON_SH=1
SECTION_T0=$SECONDS

note() { echo "$LOG_PREFIX: $*" >&2; }
die() { echo "$LOG_PREFIX: ${LOG_ERROR-error: }$*" >&2; exit 1; }
section() { printf '\n==> %s  [+%ss]\n' "$*" "$((SECONDS - SECTION_T0))" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

live_pid() {
  local pid
  [ -s "$1" ] || return 1
  pid="$(cat "$1")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

wait_until() {
  local tries="$1" step="$2" _
  shift 2
  for _ in $(seq 1 "$tries"); do "$@" && return 0; sleep "$step"; done
  "$@"
}

wait_gone() {
  local _
  for _ in $(seq 1 "$2"); do kill -0 "$1" 2>/dev/null || return 0; sleep "$3"; done
  ! kill -0 "$1" 2>/dev/null
}

terminate_pid() {
  kill -TERM "$1"
  wait_gone "$1" "$2" "$3" && return 0
  note "$4"
  kill -KILL "$1" 2>/dev/null || true
}

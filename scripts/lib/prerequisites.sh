# Sourced by scripts/test.sh and scripts/quickstart.sh: installs, with one
# `apt-get update` and only when something is missing, the Debian packages a
# build of evictd needs plus any extra packages the caller names.
#
#   ensure_packages [EXTRA_PACKAGE...]
#
# Needs `note` and `die` from the caller. Finds cargo in ~/.cargo/bin.

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
      dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
  fi
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

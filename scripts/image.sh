#!/usr/bin/env bash
# Builds evictd's container image, in one command.
#
#   scripts/image.sh [--binary PATH] [--out DIR] [--tag TAG] [--builder rootfs|containerfile]
#
# --builder rootfs (the default) needs no container registry, no daemon and
# no container tool: only the package registries this repository builds
# from. It builds the binary (`cargo build --release --locked --bin
# evictd`, unless --binary names one), assembles the image's root from it,
# the exact shared libraries `ldd` lists (the build machine's Debian
# packages), the CA bundle, passwd/group with nonroot 65532 and /tmp
# (deploy/image/rootfs.sh), and writes a real OCI image
# (deploy/image/oci-layout.py, standard-library Python):
#
#   DIR/oci/                       OCI image layout, reference TAG
#   DIR/evictd-TAG.oci.tar         the same as an oci-archive
#
# Load it anywhere with skopeo, podman or buildah, e.g.
#   skopeo copy oci-archive:target/image/evictd-0.1.0.oci.tar docker://REGISTRY/evictd:0.1.0
#   podman load -i target/image/evictd-0.1.0.oci.tar
#
# --builder containerfile builds the top-level Containerfile with the first
# of podman, buildah or docker found (needs access to the base images'
# registry): the same root (rootfs.sh runs in its build stage), tagged
# evictd:TAG in that tool's local storage.
#
# The image: user 65532:65532, entrypoint /usr/local/bin/evictd (arguments
# are evictd's: `run --config ...`), no shell, nothing written outside /tmp,
# no HEALTHCHECK (Kubernetes probes /healthz and /readyz), OCI labels
# (version, revision, source, licences, created).
#
#   DIR   default target/image (under CARGO_TARGET_DIR if set)
#   TAG   default the version in Cargo.toml
#   EVICTD_CARGO_LOCK   a file to `flock` around the cargo build (shared
#                       build machines); unset: no lock
#   SOURCE_DATE_EPOCH   the image's creation time; default the commit's time,
#                       so the same commit and binary give the same digests
#   EVICTD_IMAGE_SOURCE the org.opencontainers.image.source label (a URL)
#
# Prints the image's digest and sizes (compressed layer, unpacked) last.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_PREFIX=image
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"

binary=""
out=""
tag=""
builder=rootfs
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --builder) builder="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//; /^set -euo/d'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n1)"
licence="$(sed -n 's/^license = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n1)"
[ -n "$version" ] || die "no version in Cargo.toml"
tag="${tag:-$version}"
revision="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}"
source_url="${EVICTD_IMAGE_SOURCE:-https://github.com/evictd/evictd}"
target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
out="${out:-$target_dir/image}"

labels=(
  "org.opencontainers.image.title=evictd"
  "org.opencontainers.image.description=Tails a database's change stream and invalidates the cache keys a committed row change makes stale"
  "org.opencontainers.image.version=$version"
  "org.opencontainers.image.revision=$revision"
  "org.opencontainers.image.source=$source_url"
  "org.opencontainers.image.licenses=$licence"
  "org.opencontainers.image.created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
)

if [ "$builder" = containerfile ]; then
  tool=""
  for t in podman buildah docker; do
    command -v "$t" >/dev/null && { tool="$t"; break; }
  done
  [ -n "$tool" ] || die "--builder containerfile needs podman, buildah or docker (or use the default --builder rootfs)"
  build=("$tool" build)
  [ "$tool" = buildah ] && build=(buildah bud)
  section "building Containerfile with $tool as evictd:$tag"
  exec "${build[@]}" -f "$ROOT/Containerfile" -t "evictd:$tag" \
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
    --build-arg "SOURCE=$source_url" --build-arg "CREATED=${labels[6]#*=}" "$ROOT"
fi
[ "$builder" = rootfs ] || die "--builder must be rootfs or containerfile"

# What the root's assembly needs: ldd (libc-bin), objcopy (binutils, to strip
# debug sections: the release profile keeps them), dpkg-query (which package
# a library came from), the CA bundle, python3 for the OCI writer.
if [ -z "$binary" ]; then
  # shellcheck source=scripts/lib/prerequisites.sh
  . "$ROOT/scripts/lib/prerequisites.sh"
  ensure_packages objcopy:binutils ldd:libc-bin
  section "cargo build --release --locked --bin evictd"
  lock=()
  [ -z "${EVICTD_CARGO_LOCK:-}" ] || lock=(flock "$EVICTD_CARGO_LOCK")
  (cd "$ROOT" && ${lock[@]+"${lock[@]}"} cargo build --release --locked --bin evictd)
  binary="$target_dir/release/evictd"
else
  for need in python3 ldd objcopy; do
    command -v "$need" >/dev/null || die "$need not found (Debian: python3, libc-bin, binutils)"
  done
fi
[ -x "$binary" ] || die "$binary: no such executable"

section "assembling the root and writing the OCI image ($out)"
rootfs="$out/rootfs"
rm -rf "$rootfs" "$out/oci" "$out/evictd-$tag.oci.tar"
mkdir -p "$out"
sh "$ROOT/deploy/image/rootfs.sh" "$binary" "$rootfs"
label_args=()
for l in "${labels[@]}"; do label_args+=(--label "$l"); done
summary="$(python3 "$ROOT/deploy/image/oci-layout.py" "$rootfs" "$out/oci" --tag "$tag" \
  --archive "$out/evictd-$tag.oci.tar" "${label_args[@]}")"
unpacked="$(du -sb "$rootfs" | cut -f1)"
rm -rf "$rootfs"

python3 - "$summary" "$unpacked" "$out" "$tag" <<'EOF'
import json, sys
s = json.loads(sys.argv[1])
mib = lambda n: f"{n / 1048576:.1f} MiB"
print(f"image: {sys.argv[3]}/oci (reference {sys.argv[4]}), {s['archive']}")
print(f"  manifest {s['manifest']}")
print(f"  compressed layer {s['layer_compressed_bytes']} bytes ({mib(s['layer_compressed_bytes'])}), "
      f"unpacked {int(sys.argv[2])} bytes ({mib(int(sys.argv[2]))})")
EOF

#!/usr/bin/env python3
"""Writes an OCI image (image layout directory, optionally an oci-archive tar)
from a root filesystem directory, with nothing but the standard library.

    deploy/image/oci-layout.py ROOTFS LAYOUT_DIR --tag 0.1.0 \
        [--archive evictd-0.1.0.oci.tar] [--label KEY=VALUE ...] [--created EPOCH]

The image has one layer: ROOTFS as a gzip-compressed tar in which every entry
is owned by root (0:0) except /home/nonroot (65532:65532), with normalised
modes (directories and executables 0755, other files 0644, /tmp 1777) and one
modification time (--created, default SOURCE_DATE_EPOCH or 0), so the same
ROOTFS always gives the same digests. The image config runs
/usr/local/bin/evictd as 65532:65532 with no command (the caller's arguments
are evictd's), PATH and SSL_CERT_FILE set, port 9187 exposed, and no
HEALTHCHECK (Kubernetes probes /healthz and /readyz itself).

Formats: https://github.com/opencontainers/image-spec (image-layout.md,
manifest.md, config.md, image-index.md). An oci-archive is a tar of the
layout directory (what podman, skopeo and buildah read as `oci-archive:`).

Prints a JSON summary on stdout: digests and sizes.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
import time

NONROOT = 65532
ENTRYPOINT = ["/usr/local/bin/evictd"]
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def layer_tar(rootfs: str, mtime: int) -> bytes:
    """The root filesystem as an uncompressed tar, entries sorted, normalised."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = []
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                paths.append(os.path.join(dirpath, name))
        for path in sorted(paths, key=lambda p: os.path.relpath(p, rootfs)):
            rel = os.path.relpath(path, rootfs)
            info = tar.gettarinfo(path, arcname=rel)
            info.mtime = mtime
            info.uname = info.gname = ""
            owner = NONROOT if rel == "home/nonroot" or rel.startswith("home/nonroot/") else 0
            info.uid = info.gid = owner
            if info.isdir():
                info.mode = 0o1777 if rel == "tmp" else 0o755
            elif info.issym():
                info.mode = 0o777
            elif info.isreg():
                info.mode = 0o755 if os.stat(path).st_mode & stat.S_IXUSR else 0o644
            else:
                sys.exit(f"oci-layout.py: {path}: only directories, files and symlinks belong in the image")
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def write_blob(layout: str, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rootfs")
    ap.add_argument("layout")
    ap.add_argument("--tag", required=True, help="org.opencontainers.image.ref.name in index.json")
    ap.add_argument("--archive", help="also write this oci-archive tar")
    ap.add_argument("--label", action="append", default=[], help="KEY=VALUE, repeatable")
    ap.add_argument("--created", type=int, default=int(os.environ.get("SOURCE_DATE_EPOCH", "0")))
    ap.add_argument("--arch", default="amd64")
    args = ap.parse_args()

    labels = {}
    for kv in args.label:
        key, sep, value = kv.partition("=")
        if not sep:
            ap.error(f"--label {kv!r}: expected KEY=VALUE")
        labels[key] = value
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(args.created))

    if os.path.exists(args.layout) and os.listdir(args.layout):
        sys.exit(f"oci-layout.py: {args.layout} exists and is not empty")
    os.makedirs(os.path.join(args.layout, "blobs", "sha256"))

    raw = layer_tar(args.rootfs, args.created)
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    gz = io.BytesIO()
    # mtime=0 and no file name in the gzip header: reproducible bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0, compresslevel=9) as g:
        g.write(raw)
    layer = gz.getvalue()
    layer_digest = write_blob(args.layout, layer)

    config = {
        "created": created,
        "architecture": args.arch,
        "os": "linux",
        "config": {
            "User": f"{NONROOT}:{NONROOT}",
            "Entrypoint": ENTRYPOINT,
            "Env": [
                "PATH=/usr/local/bin:/usr/bin:/bin",
                "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
            ],
            "WorkingDir": "/home/nonroot",
            "ExposedPorts": {"9187/tcp": {}},
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "deploy/image/rootfs.sh + deploy/image/oci-layout.py"}],
    }
    config_bytes = canonical(config)
    config_digest = write_blob(args.layout, config_bytes)

    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": len(layer)}],
        "annotations": labels,
    }
    manifest_bytes = canonical(manifest)
    manifest_digest = write_blob(args.layout, manifest_bytes)

    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "platform": {"architecture": args.arch, "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": args.tag},
            }
        ],
    }
    with open(os.path.join(args.layout, "index.json"), "wb") as f:
        f.write(canonical(index))
    with open(os.path.join(args.layout, "oci-layout"), "wb") as f:
        f.write(canonical({"imageLayoutVersion": "1.0.0"}))

    if args.archive:
        with tarfile.open(args.archive, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in ["oci-layout", "index.json", "blobs"]:
                tar.add(os.path.join(args.layout, name), arcname=name,
                        filter=lambda ti: _plain(ti, args.created))

    json.dump(
        {
            "tag": args.tag,
            "manifest": manifest_digest,
            "config": config_digest,
            "layer": layer_digest,
            "layer_compressed_bytes": len(layer),
            "layer_uncompressed_bytes": len(raw),
            "archive": args.archive,
            "archive_bytes": os.path.getsize(args.archive) if args.archive else None,
        },
        sys.stdout,
        indent=2,
    )
    print()
    return 0


def _plain(info: tarfile.TarInfo, mtime: int) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = mtime
    return info


if __name__ == "__main__":
    sys.exit(main())

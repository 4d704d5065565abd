#!/usr/bin/env bash
# Mount a memory filesystem backed by transparent huge pages, for the host arena
# (host.shm_dir) and the daemon benchmark's --shm-dir. Needs root. Idempotent.
#   sudo bash scripts/mount_huge_shm.sh [DIR] [SIZE]     (default /mnt/kvtier-huge, 4G)
set -euo pipefail
dir="${1:-/mnt/kvtier-huge}"
size="${2:-4G}"
if mountpoint -q "$dir"; then
    echo "$dir is already mounted: $(findmnt -no FSTYPE,OPTIONS "$dir")"
    exit 0
fi
mkdir -p "$dir"
mount -t tmpfs -o "size=$size,huge=always,mode=1777" tmpfs "$dir"
echo "mounted $dir: $(findmnt -no FSTYPE,OPTIONS "$dir")"

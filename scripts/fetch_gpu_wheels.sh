#!/usr/bin/env bash
# Download, here, the wheels the lent GPU machine lacks (it has no network): megatron-core for its Python 3.12,
# the pinned development version and the newest, one folder per version (two versions of a package in one
# install would stop it). They land in gpu_wheels/ (git-ignored), which the device tool's `carry` brings along;
# scripts/gpu_check.sh installs each with `pip install --no-index --no-deps --target`.
#   bash scripts/fetch_gpu_wheels.sh            # gpu_wheels/megatron-core-0.16.1/, gpu_wheels/megatron-core-0.19.2/
# megatron-core needs only torch, numpy and packaging, which the GPU image has.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-gpu_wheels}
VERSIONS=${VERSIONS:-"0.16.1 0.19.2"}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for version in $VERSIONS; do
  dir="$DEST/megatron-core-$version"
  mkdir -p "$dir"
  if ls "$dir"/megatron_core-"$version"-*.whl >/dev/null 2>&1; then
    echo "have $(ls "$dir"/*.whl)"
    continue
  fi
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$dir" "megatron-core==$version"
  echo "fetched $(ls "$dir"/*.whl)"
done
du -sh "$DEST"

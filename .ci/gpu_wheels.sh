#!/usr/bin/env bash
# Wheels for `make gpu-check` on a GPU machine without network: what the GPU tests and the bench import that the
# H200 image lacks (its package list: /work/.library/device/KINDS.md; of `asff_viz.bench.gpu_check.REQUIRED` only
# pycocotools), for its Python 3.12, at the version the CPU environment runs. Run where pip can download;
# `make gpu-check` installs what is in .whl/ (git-ignored) first. Carry .whl with the working tree.
#
#   bash .ci/gpu_wheels.sh            # writes .whl/
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(pycocotools==2.0.11)
PLATFORMS=()
for platform in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  PLATFORMS+=(--platform "$platform")
done
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${PACKAGES[@]}"
echo "$(ls .whl | wc -l) wheel(s) in .whl/ ($(du -sh .whl | cut -f1)): carry .whl to the GPU machine, then make gpu-check"

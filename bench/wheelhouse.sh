#!/usr/bin/env bash
# Download the wheels that bench/gpu_check.sh needs beyond torch and triton (bench/gpu_requirements.txt and what
# they depend on) for a Linux x86-64 machine with no network, into bench/wheelhouse/ (git ignores it; some tens
# of MB). Carry that folder with the working tree: gpu_check.sh installs from it offline, with pip --no-index.
#
#     bash bench/wheelhouse.sh 3.12      # the GPU machine's Python version (default: that of python3 here)
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')}
python3 -m pip download --quiet --dest bench/wheelhouse --only-binary=:all: --python-version "$version" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -r bench/gpu_requirements.txt
ls bench/wheelhouse
du -sh bench/wheelhouse

#!/usr/bin/env bash
# Set up .venv on a fresh machine: the torch/torchvision pair that imports here, then the project.
# Usage: bash scripts/bootstrap.sh [EXTRA[,EXTRA...]]   e.g. bash scripts/bootstrap.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
case "$(uname -m)" in
  aarch64|arm64) torch_pair=(torch==2.9.1 torchvision==0.24.1) ;;
  *) torch_pair=(torch==2.14.1 torchvision==0.29.1) ;;
esac
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${torch_pair[@]}"
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
# the FiftyOne App browser test drives Debian's chromium (never a browser download); the video
# tests need Debian's ffmpeg, as FiftyOne does to read and sample videos
if [[ ",$extras," == *",test,"* ]] && [ "$(id -u)" = 0 ]; then
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v ffmpeg >/dev/null || missing+=(ffmpeg)
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

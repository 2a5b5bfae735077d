#!/usr/bin/env bash
# Debian packages used by the study and the browser test: Fashion-MNIST (faithfulness study) and headless Chromium
# (the demo page's screenshot test). Installed only when missing; tests that need them skip when they are absent.
set -euo pipefail
need=()
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || need+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null \
    || echo "system_deps: could not install ${need[*]}; the tests that need them will skip" >&2
fi

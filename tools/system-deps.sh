#!/usr/bin/env bash
# Installs the Debian packages the integration tests use, when they are missing and we can.
set -u
pkgs=(chromium ffmpeg fonts-dejavu-core
      gir1.2-gst-rtsp-server-1.0 gir1.2-gstreamer-1.0 python3-gi
      gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: missing system packages (${missing[*]}); tests that need them will be skipped." >&2
  echo "      install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 0
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || true
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || {
  echo "warning: apt-get install failed; tests that need these packages will be skipped" >&2
}
exit 0

#!/usr/bin/env bash
# Refresh the Leaflet files the operator page ships (teltonika/processor/live/static/leaflet/)
# from the npm registry with `npm pack`, then print the SHA-256 sums that
# tests/processor/live/test_live_static.py checks. Usage: scripts/vendor-leaflet.sh [VERSION]
set -euo pipefail
version=${1:-1.9.4}
cd "$(dirname "$0")/.."
target=teltonika/processor/live/static/leaflet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "leaflet@$version" >/dev/null && tar -xzf leaflet-"$version".tgz)
mkdir -p "$target"
cp "$work/package/dist/leaflet.js" "$work/package/dist/leaflet.css" "$work/package/LICENSE" "$target/"
echo "leaflet $version vendored into $target; update LEAFLET_SHA256 in the test with:"
(cd "$target" && sha256sum leaflet.js leaflet.css LICENSE)

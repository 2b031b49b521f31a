#!/usr/bin/env bash
# Builds the portal with cargo-leptos, starts it on a fresh SQLite database with the dev sign-in,
# and runs the browser check in Debian's Chromium (never a downloaded browser).
#
#   end2end/run.sh            # needs: chromium (apt-get install chromium), node + npm
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
die() { printf 'end2end/run.sh: %s\n' "$*" >&2; exit 1; }

[ -x /usr/bin/chromium ] || die "Debian's chromium is missing: apt-get install -y chromium"
command -v npm >/dev/null || die "npm is missing"
scripts/portal-tools.sh
cargo leptos build
(cd end2end && [ -d node_modules/playwright-core ] || npm install --no-audit --no-fund --no-package-lock)

port=${PORTAL_PORT:-3400}
work=$(mktemp -d)
target="${CARGO_TARGET_DIR:-$root/target}"
LEPTOS_SITE_ROOT="$root/target/site" LEPTOS_OUTPUT_NAME=gatehouse-portal \
  "$target/debug/gatehouse-portal" --listen "127.0.0.1:$port" \
  --database "sqlite:$work/portal.db" --dev-sign-in > "$work/portal.log" 2>&1 &
portal=$!
trap 'kill "$portal" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 50); do
  curl -sf "http://127.0.0.1:$port/" >/dev/null && break
  sleep 0.2
done
(cd end2end && PORTAL_URL="http://127.0.0.1:$port" SCREENSHOTS="$root/target/end2end" node hydration.mjs) \
  || { cat "$work/portal.log" >&2; exit 1; }

#!/usr/bin/env bash
# Builds the portal (cargo leptos), the gateway and the simulator, installs the pinned npm packages
# (package-lock.json), and runs three browser checks in Debian's Chromium (never a downloaded
# browser), each on ports the OS picks:
#   hydration.mjs  the portal alone with the development sign-in: the wasm app hydrates (the
#                  development front end first; at the end the release front end that
#                  scripts/run.sh serves, which wasm-opt has optimised);
#   scenario.mjs   portal + gateway + simulator + a real OpenID Connect provider (oidc-provider),
#                  no development sign-in: rules, keys, revocation, roles, activity;
#   insights.mjs   the same with Entra ID tokens (a local key-set double) from two IPs and the
#                  portal reading the gateway's SQLite audit store: audit search, call detail,
#                  CSV export, usage by group for a team lead, dashboard. Sign-in goes through
#                  the header's "Sign in" link and the exports through their buttons, clicked
#                  once the wasm app runs (html[data-hydrated]).
# Screenshots (1280 px) go to target/end2end.
#
#   end2end/run.sh            # needs: chromium (apt-get install chromium), node + npm
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
die() { printf 'end2end/run.sh: %s\n' "$*" >&2; exit 1; }

[ -x /usr/bin/chromium ] || die "Debian's chromium is missing: apt-get install -y chromium"
command -v node >/dev/null || die "node is missing"
command -v npm >/dev/null || die "npm is missing"
scripts/portal-tools.sh
# The portal server, the gateway and the simulator exactly as scripts/test.sh builds them (the
# whole workspace with its tests, so that the dependencies are compiled once, with one set of
# features: after scripts/test.sh this is done already), then only the portal's front end with
# cargo leptos (the wasm app, the style sheet and the assets in target/site). The server binary
# is the workspace build's: a server cargo leptos built would be the same code, compiled again
# with the features of the portal package alone.
cargo build --workspace --bins --tests --locked || die "building the workspace failed"
cargo leptos build --frontend-only || die "cargo leptos build --frontend-only failed"
(cd end2end && npm ci --no-audit --no-fund) || die "npm ci in end2end failed"

target="${CARGO_TARGET_DIR:-$root/target}"
bin="$target/debug"
shots="$root/target/end2end"
free_port() { node -e "const s=require('net').createServer();s.listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})"; }

# The portal of a hydration check, stopped however the script ends.
portal="" work=""
trap '[ -z "$portal" ] || kill "$portal" 2>/dev/null; [ -z "$work" ] || rm -rf "$work"' EXIT

# The portal alone with the development sign-in, from the binary $1: its wasm app must hydrate.
hydration_check() {
  local binary=$1 screenshots=$2 port
  port=$(free_port)
  work=$(mktemp -d)
  LEPTOS_SITE_ROOT="$root/target/site" LEPTOS_OUTPUT_NAME=gatehouse-portal \
    "$binary" --listen "127.0.0.1:$port" \
    --database "sqlite:$work/portal.db" --dev-sign-in > "$work/portal.log" 2>&1 &
  portal=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/" >/dev/null && break
    sleep 0.2
  done
  (cd end2end && PORTAL_URL="http://127.0.0.1:$port" SCREENSHOTS="$screenshots" node hydration.mjs) \
    || { cat "$work/portal.log" >&2; exit 1; }
  kill "$portal" 2>/dev/null || true
  wait "$portal" 2>/dev/null || true
  portal=""
  rm -rf "$work"
  work=""
}

echo "== hydration check (development sign-in)"
hydration_check "$bin/gatehouse-portal" "$shots/hydration"

echo "== scenario (OpenID Connect provider, gateway, simulator)"
(cd end2end && GATEHOUSE_BIN_DIR="$bin" LEPTOS_SITE_ROOT="$root/target/site" \
  SCREENSHOTS="$shots/scenario" node scenario.mjs)

echo "== insights (audit search, usage, dashboard over the gateway's audit store)"
(cd end2end && GATEHOUSE_BIN_DIR="$bin" LEPTOS_SITE_ROOT="$root/target/site" \
  SCREENSHOTS="$shots/insights" node insights.mjs)

# Last, since it replaces the development front end in target/site: the release front end that
# scripts/run.sh serves (optimised by wasm-opt, the step that can break an app that works in a
# development build) must start in the browser too. Only the front end is built for release: the
# server's release build is the same code as the one under test, and it would compile every
# dependency a third time.
echo "== hydration check of the release front end (the one scripts/run.sh serves)"
scripts/build-portal-release.sh --frontend-only
hydration_check "$bin/gatehouse-portal" "$shots/hydration-release"

#!/usr/bin/env bash
# Runs Gatehouse on its embedded default, on loopback: the portal (SQLite, development sign-in),
# the gateway it pushes its configuration to, and the built-in simulator backend. Ctrl-C stops
# everything.
#
#   scripts/run.sh                 # portal on 127.0.0.1:3000, gateway on :8080, simulator on :9100
#   scripts/run.sh --gateway-only  # the gateway and the simulator alone, with a development key
#   GATEHOUSE_PORT=8181 GATEHOUSE_PORTAL_PORT=3100 GATEHOUSE_SIMULATOR_PORT=9200 scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
port=${GATEHOUSE_PORT:-8080}
portal_port=${GATEHOUSE_PORTAL_PORT:-3000}
sim_port=${GATEHOUSE_SIMULATOR_PORT:-9100}
dev="$root/var/dev"
target="${CARGO_TARGET_DIR:-$root/target}/release"
mode=portal
case "${1:-}" in
  --gateway-only) mode=gateway ;;
  "") ;;
  *) printf 'usage: scripts/run.sh [--gateway-only]\n' >&2; exit 2 ;;
esac

die() { printf 'scripts/run.sh: %s\n' "$*" >&2; exit 1; }
command -v cargo >/dev/null || die "cargo is missing: install Rust with rustup first"
command -v curl >/dev/null || die "curl is missing"

echo "== building (release)"
cargo build --release --locked -p gatehouse-gateway -p gatehouse-simulator
if [ "$mode" = portal ]; then
  scripts/build-portal-release.sh
fi

mkdir -p "$dev"
if [ ! -s "$dev/admin-token" ]; then
  "$target/gatehouse-gateway" keygen | sed -n 1p > "$dev/admin-token"
  chmod 600 "$dev/admin-token"
fi

pids=()
stop() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop EXIT
wait_for() { # URL, what
  for _ in $(seq 100); do
    curl -s -o /dev/null "$1" && return 0
    sleep 0.2
  done
  die "$2 did not start (see the lines above)"
}

"$target/gatehouse-simulator" --listen "127.0.0.1:$sim_port" --id simulator --chunk-delay-ms 40 &
pids+=($!)

server_yaml() {
  cat <<YAML
# Written by scripts/run.sh: the embedded default. See examples/gateway.yaml for every option.
server:
  listen: 127.0.0.1:$port
  gateway_id: dev
  state_dir: $dev/state
  admin_token: file:$dev/admin-token
  audit:
    database: sqlite:$dev/audit.db
  log_format: text
  shutdown_drain_seconds: 5
YAML
}

if [ "$mode" = gateway ]; then
  if [ ! -s "$dev/key" ]; then
    "$target/gatehouse-gateway" keygen | sed -n 1p > "$dev/key"
    chmod 600 "$dev/key"
  fi
  key=$(cat "$dev/key")
  hash=$(printf '%s' "$key" | "$target/gatehouse-gateway" hash-key)
  # A configuration the portal pushed earlier must not win over this file.
  rm -f "$dev/state/last-known-good.json"
  { server_yaml; cat <<YAML
snapshot:
  version: 1
  trusted_proxies: [127.0.0.1/32]
  subscriptions:
    - id: dev
      display_name: Development key (scripts/run.sh)
      product: dev
      primary_key_hash: "$hash"
  pools:
    - id: simulator
      deployments: [gpt-4o, gpt-4o-mini, text-embedding-3-small, whisper, tts, dall-e-3]
      serves_resources: true
      members:
        - id: simulator
          kind: azure_openai
          endpoint: http://127.0.0.1:$sim_port
YAML
  } > "$dev/gateway.yaml"
  cat <<MSG

Gatehouse is starting on http://127.0.0.1:$port  (backend: the SIMULATOR on 127.0.0.1:$sim_port, not a model)
  key:           $key   (also in var/dev/key)
  audit records: var/dev/audit.db (SQLite: tables ApiManagementGatewayLogs, ApiManagementGatewayLlmLog; full-text index in var/dev/audit.db-search)

Try it:
  curl -s http://127.0.0.1:$port/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 \\
    -H "api-key: $key" -H 'content-type: application/json' \\
    -d '{"messages":[{"role":"user","content":"Hello"}]}'

MSG
  "$target/gatehouse-gateway" serve --config "$dev/gateway.yaml" &
  pids+=($!)
  wait "${pids[-1]}"
  exit
fi

# The portal owns the gateway's configuration: the gateway starts empty at version 0, so that the
# portal's first version (1) is accepted. A fresh portal database starts a fresh gateway state.
if [ ! -f "$dev/portal.db" ]; then
  rm -f "$dev/state/last-known-good.json"
fi
{ server_yaml; printf 'snapshot:\n  version: 0\n'; } > "$dev/gateway.yaml"
"$target/gatehouse-gateway" serve --config "$dev/gateway.yaml" &
pids+=($!)
wait_for "http://127.0.0.1:$port/healthz" "the gateway"

portal_url="http://127.0.0.1:$portal_port"
LEPTOS_SITE_ROOT="$root/target/site" LEPTOS_OUTPUT_NAME=gatehouse-portal \
  "$target/gatehouse-portal" --listen "127.0.0.1:$portal_port" --public-url "$portal_url" \
  --database "sqlite:$dev/portal.db" --dev-sign-in \
  --gateway "dev=http://127.0.0.1:$port=file:$dev/admin-token" \
  --audit-database "sqlite:$dev/audit.db" \
  --model-prices "${GATEHOUSE_PORTAL_MODEL_PRICES:-gpt-4o=2.5/10,gpt-4o-mini=0.15/0.6}" &
pids+=($!)
wait_for "$portal_url/" "the portal"

# First run: a pool with the simulator as its member, created through the portal like an admin
# would (the activity log names scripts/run.sh as its author).
jar="$dev/seed-cookies"
curl -s -o /dev/null -c "$jar" -H "Origin: $portal_url" \
  --data-urlencode role=Admin --data-urlencode name=scripts/run.sh "$portal_url/auth/dev"
api() { curl -s -o /dev/null -w '%{http_code}' -b "$jar" -H "Origin: $portal_url" \
  -H 'Accept: application/json' "$portal_url/api/$1" "${@:2}"; }
status=$(api create_pool --data-urlencode id=simulator --data-urlencode serves_resources=true \
  --data-urlencode 'deployments=gpt-4o, gpt-4o-mini, text-embedding-3-small, whisper, tts, dall-e-3')
case "$status" in
  200) api save_member --data-urlencode pool_id=simulator --data-urlencode id=simulator \
         --data-urlencode kind=azure_openai --data-urlencode "endpoint=http://127.0.0.1:$sim_port" >/dev/null ;;
  422) ;; # it exists from an earlier run
  *) die "could not create the simulator pool in the portal (HTTP $status)" ;;
esac
curl -s -o /dev/null -b "$jar" -H "Origin: $portal_url" -X POST "$portal_url/auth/sign-out"
rm -f "$jar"

cat <<MSG

Gatehouse is running on loopback (backend: the SIMULATOR on 127.0.0.1:$sim_port, not a model).

  Portal:   $portal_url   (development sign-in: pick a role, no password)
  Gateway:  http://127.0.0.1:$port   (configured by the portal; audit records in var/dev/audit.db)

Try it:
  1. Open $portal_url, choose Admin and press "Dev sign-in".
  2. Subscriptions: create one (id my-team); copy the key it shows once.
  3. Access rules: grant Subscription my-team the deployments gpt-4o*.
  4. curl -s http://127.0.0.1:$port/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 \\
       -H "api-key: THE-KEY" -H 'content-type: application/json' \\
       -d '{"messages":[{"role":"user","content":"Hello"}]}'
  5. Dashboard, Usage and Audit (sign in as Auditor) show the call; the simulator's answers
     are priced at the example prices of GATEHOUSE_PORTAL_MODEL_PRICES.

Ctrl-C stops the portal, the gateway and the simulator.
MSG
wait -n "${pids[@]}"

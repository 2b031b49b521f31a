#!/usr/bin/env bash
# Load benchmark: the same POST chat-completions load (~1 KB JSON body, concurrency 1, 16, 64),
# measured in one run
#   1. directly against a fast mock upstream (nginx returning a static chat.completion),
#   2. through nginx as a plain reverse proxy to that mock,
#   3. through the floor: a bare pass-through proxy on the gateway's parts (tokio, hyper-util's
#      server and pooling client, mimalloc; bench/src/bin/hyper_floor.rs), which does none of the
#      gateway's work: what any gateway on those parts pays per call (a figure, not a target),
#   4. through the Gatehouse gateway to that mock (subscription key),
#   5. through the gateway with the identity pipeline on: an Entra ID token on every call, checked
#      against JWKS served by the mock (same nginx), plus an access rule (and limits, see below),
# and reported per concurrency as latency p50/p99, requests per second, CPU time per request and
# peak RSS of the proxy processes, with the gateway-vs-nginx ratios and their targets.
#
#   bench/gateway_load.sh                      # everything, ~2-3 minutes once the gateway is built
#   BENCH_DURATION=30 bench/gateway_load.sh    # longer measured runs
#
# Environment (all optional):
#   BENCH_DURATION=10        seconds per measured run (a warm-up of BENCH_WARMUP seconds precedes it)
#   BENCH_WARMUP=2           seconds of warm-up before each measured run (not measured)
#   BENCH_CONCURRENCY="1 16 64"   connections (= requests in flight) per run
#   BENCH_WRK_THREADS=2      wrk threads (capped at the concurrency)
#   BENCH_NGINX_WORKERS=1    worker_processes of the nginx reverse proxy (see bench/README.md)
#   BENCH_GATEWAY=auto       auto: build and measure the gateway; if it does not build, skip it
#                            on:   a gateway that does not build is an error
#                            off:  measure direct, nginx and the floor only
#   GATEHOUSE_GATEWAY_BIN    use this gateway binary instead of building one
#   BENCH_CAPTURE="sqlite postgres"
#                            capture variants measured after the key-only gateway (off: none):
#                            full capture (bodies up to 1 MiB) recorded into SQLite / PostgreSQL
#                            (BENCH_POSTGRES_URL, a database made and dropped by the run); each is
#                            held to added p50 <= 1.10 x capture off at c=16 and 64, and to
#                            records == answered calls (zero lost)
#   BENCH_IDENTITY="jwt jwt-limits jwt-limits-redis"
#                            identity variants measured after the key-only gateway (off: none):
#                            a token and an access rule; plus per-user TPM/RPM and an hourly quota
#                            (never reached) in-process; the same limits in Redis (127.0.0.1:6379,
#                            BENCH_REDIS_URL). Each is held to added p50 <= 1.15 x key-only.
#   BENCH_KEEP_TMP=1         keep the temporary directory (configs, logs, raw wrk output)
#   BENCH_INSTRUCTIONS=N     instead of the load runs: the user-space instructions per call of the
#                            nginx proxy, the floor and the key-only gateway, each under valgrind's
#                            callgrind for N calls (one connection, after 300 untimed ones), and
#                            their ratio, with the gateway's 25 costliest functions. Instruction
#                            counts do not depend on other load on the machine (seconds do).
#                            With BENCH_CAPTURE variants, also each capture gateway's instructions
#                            per call, its audit writer's (and for SQLite its store's) included,
#                            against the key-only gateway's, both with calls on
#                            BENCH_INSTRUCTIONS_CONNECTIONS=16 connections at once.
#
# Output: a table on stdout, and bench/out/gateway_load-<timestamp>.json. Exit status 0 when every
# part that ran worked (whether or not the targets were met), 1 when something broke (a process
# did not start, a request failed, a run had errors).
# Needs root for apt-get (nginx, wrk) when they are missing.
set -euo pipefail

bench_dir=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$bench_dir/.." && pwd)
cd "$root"

duration=${BENCH_DURATION:-10}
warmup=${BENCH_WARMUP:-2}
concurrency=${BENCH_CONCURRENCY:-1 16 64}
wrk_threads=${BENCH_WRK_THREADS:-2}
nginx_workers=${BENCH_NGINX_WORKERS:-1}
gateway_mode=${BENCH_GATEWAY:-auto}
instructions=${BENCH_INSTRUCTIONS:-}
# A command prefix for the measured proxies (valgrind in BENCH_INSTRUCTIONS mode).
launch=()
identity_variants=${BENCH_IDENTITY:-jwt jwt-limits jwt-limits-redis}
capture_variants=${BENCH_CAPTURE:-sqlite postgres}
# Connections used at once by the capture variants of BENCH_INSTRUCTIONS (and their baseline).
capture_connections=${BENCH_INSTRUCTIONS_CONNECTIONS:-16}
[ "$capture_variants" = off ] && capture_variants=""
postgres_base=${BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432}
bench_database="gh_bench_$$"
made_database=""
# What the gateway records and keeps, as start_gateway writes it into the config: the key-only
# gateway records metadata only, nowhere; a capture gateway records bodies up to 1 MiB into
# `database` (see capture_database).
records_nothing() {
  audit_yaml="    jsonl: null"
  capture_yaml="{max_request_body_bytes: 0, max_response_body_bytes: 0}"
}
records_everything() {
  audit_yaml="    database: $database"
  capture_yaml="{max_request_body_bytes: 1048576, max_response_body_bytes: 1048576}"
}
records_nothing
redis_url=${BENCH_REDIS_URL:-redis://127.0.0.1:6379}
redis_prefix="gatehouse-bench-$$:"
[ "$identity_variants" = off ] && identity_variants=""
tenant="11111111-1111-1111-1111-111111111111"
audience="api://gatehouse-bench"

api_key="bench-key-$(date +%s)-$$"
deployment="gpt-4o-mini"
request_path="/openai/deployments/$deployment/chat/completions?api-version=2024-10-21"

work=""           # temporary directory, made in main
started_pids=()   # every long-running process this script started (nginx masters, the gateway)
wrk_pid=""        # the wrk run in progress, if any
wrk_script=""     # the wrk Lua script of the target being measured
broken=()         # what went wrong; non-empty means exit 1

say()  { printf '\n== %s\n' "$*" >&2; }
note() { printf '   %s\n' "$*" >&2; }
die()  { printf 'bench/gateway_load.sh: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# tools

ensure_tools() {
  local missing=()
  command -v nginx >/dev/null || missing+=(nginx-light)
  command -v wrk   >/dev/null || missing+=(wrk)
  command -v curl  >/dev/null || missing+=(curl)
  command -v sqlite3 >/dev/null || missing+=(sqlite3)
  command -v psql  >/dev/null || missing+=(postgresql-client)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    [ "$(id -u)" -eq 0 ] || die "need ${missing[*]}: run as root (apt-get) or install them first"
    command -v apt-get >/dev/null || die "need ${missing[*]} and there is no apt-get"
    apt-get update -qq || die "apt-get update failed"
    # Keep the distribution's nginx service from starting on :80 during the install.
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
    fi
    local ok=1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           "${missing[@]/nginx-light/nginx}" \
      || ok=""
    [ -z "$made_policy" ] || rm -f "$policy"
    [ -n "$ok" ] || die "apt-get install ${missing[*]} failed"
  fi
  command -v nginx >/dev/null || die "nginx is still missing after apt-get"
  command -v wrk   >/dev/null || die "wrk is still missing after apt-get"
  command -v python3 >/dev/null || die "python3 is missing (needed for bench/lib/report.py)"
  command -v sha256sum >/dev/null || die "sha256sum is missing (coreutils)"
}

# ---------------------------------------------------------------------------------------------
# processes

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ -n "$wrk_pid" ]; then kill "$wrk_pid" 2>/dev/null || true; fi
  local pid
  for pid in "${started_pids[@]+"${started_pids[@]}"}"; do
    stop_process "$pid"
  done
  drop_bench_database
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ "${BENCH_KEEP_TMP:-}" = 1 ]; then
      printf 'kept %s\n' "$work" >&2
    else
      rm -rf "$work"
    fi
  fi
  exit "$status"
}

# Stop a process we started and its children (nginx workers): TERM, then KILL after 5 s.
stop_process() {
  local pid=$1 children _
  kill -0 "$pid" 2>/dev/null || return 0
  children=$(pgrep -P "$pid" || true)
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for pid in $children; do
    kill -KILL "$pid" 2>/dev/null || true
  done
}

forget_pid() {
  local pid=$1 kept=() p
  for p in "${started_pids[@]+"${started_pids[@]}"}"; do [ "$p" = "$pid" ] || kept+=("$p"); done
  started_pids=("${kept[@]+"${kept[@]}"}")
}

# Wait until `curl` gets HTTP 200 from a URL (GET), or the process dies, or 30 s pass.
wait_http_200() {
  local url=$1 pid=$2 what=$3 _ code
  for _ in $(seq 300); do
    kill -0 "$pid" 2>/dev/null || { note "$what exited before it was ready"; return 1; }
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)
    [ "$code" = 200 ] && return 0
    sleep 0.1
  done
  note "$what did not answer 200 on $url within 30 s (last: $code)"
  return 1
}

# All pids of a process tree rooted at $1 (nginx master + workers, or the gateway).
tree_pids() {
  local pid=$1
  printf '%s\n' "$pid"
  pgrep -P "$pid" || true
}

# Sums of utime and stime clock ticks of the given pids (threads included), as "utime stime".
cpu_ticks() {
  local user=0 sys=0 pid stat fields
  for pid in "$@"; do
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    # Field 2 (comm) may contain spaces: cut after the last ')'.
    read -r -a fields <<< "${stat##*) }"
    # After comm the array starts at field 3, so utime (14) is index 11 and stime (15) index 12.
    user=$(( user + fields[11] ))
    sys=$(( sys + fields[12] ))
  done
  printf '%s %s\n' "$user" "$sys"
}

# Sum of a /proc/<pid>/status field in kB (VmHWM, VmRSS) over the given pids.
status_kb() {
  local field=$1 total=0 pid value
  shift
  for pid in "$@"; do
    value=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    total=$(( total + ${value:-0} ))
  done
  printf '%s\n' "$total"
}

# Reset the peak RSS (VmHWM) of the given pids to their current RSS; 1 if it worked for all.
reset_hwm() {
  local pid ok=1
  for pid in "$@"; do
    { echo 5 > "/proc/$pid/clear_refs"; } 2>/dev/null || ok=0
  done
  printf '%s\n' "$ok"
}

# Busy and total jiffies of the whole machine, from the first line of /proc/stat.
host_jiffies() {
  local _cpu user nice system idle iowait irq softirq steal _rest
  read -r _cpu user nice system idle iowait irq softirq steal _rest < /proc/stat
  printf '%s %s\n' $(( user + nice + system + irq + softirq + steal )) \
    $(( user + nice + system + idle + iowait + irq + softirq + steal ))
}

# Percentage of the machine's CPU time that was busy over $1 seconds (other load on the machine).
host_busy_pct() {
  local a b
  a=$(host_jiffies); sleep "$1"; b=$(host_jiffies)
  printf '%s\n' $(( 100 * (${b% *} - ${a% *}) / ( ${b#* } - ${a#* } > 0 ? ${b#* } - ${a#* } : 1 ) ))
}

# A whitespace-separated list as JSON array items: "1 2\n3" -> "1,2,3".
json_list() {
  local items
  read -r -d '' -a items <<< "$1" || true
  (IFS=,; printf '%s' "${items[*]}")
}

# ---------------------------------------------------------------------------------------------
# fixtures

write_fixtures() {
  # The request: a realistic chat-completions body of about 1 KB.
  cat > "$work/body.json" <<'EOF'
{"messages":[{"role":"system","content":"You are the internal assistant of the Contoso finance team. Answer concisely and in plain language, cite the section of the travel and expense policy you rely on, and never reveal personal data about employees, customers or suppliers. If a question is outside finance, say so and suggest the right team."},{"role":"user","content":"I travelled to Lisbon for three days for the customer workshop and paid the hotel, two dinners with the customer, the airport taxi and a train ticket myself. The hotel was above the usual city limit because of a conference in town. Which of these can I claim, which receipts do I need, do I need a pre-approval for the hotel, and by when must I submit the claim so that it is paid with the next salary run? Please also tell me whether the dinners count as entertainment."}],"max_tokens":300,"temperature":0.2,"top_p":1,"n":1,"stream":false,"presence_penalty":0,"frequency_penalty":0,"user":"bench-user-0001"}
EOF
  # The mock's answer: a static chat.completion (no ' or $: it goes into an nginx string).
  response='{"id":"chatcmpl-bench0001","object":"chat.completion","created":1733000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_bench","choices":[{"index":0,"message":{"role":"assistant","content":"You can claim the hotel, the train ticket and the airport taxi as travel costs (policy 4.2). The hotel needs a pre-approval above the city limit, which a conference in town justifies (4.5). The dinners with the customer count as entertainment (6.1). Keep itemised receipts and submit by the 20th.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":212,"completion_tokens":64,"total_tokens":276,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}'

  write_wrk_script "$work/post.lua" "api-key" "$api_key"
  # The Entra stand-in: a signed token, and the discovery document and JWKS the mock serves.
  python3 "$bench_dir/lib/report.py" entra-fixtures \
    --key "$root/gateway/tests/fixtures/entra/test-signing-key-a.pem" \
    --public "$root/gateway/tests/fixtures/entra/test-signing-keys.public.json" \
    --authority "http://127.0.0.1:$mock_port" --tenant "$tenant" --audience "$audience" \
    --out "$work/entra" || die "could not make the Entra token fixtures (openssl missing?)"
  write_wrk_script "$work/post-jwt.lua" "Authorization" "Bearer $(cat "$work/entra/token.txt")"
}

# wrk script: POST the body with one credential header; at the end print one JSON line to parse.
# $1 file, $2 header name, $3 header value.
write_wrk_script() {
  {
    printf 'wrk.method = "POST"\n'
    printf 'wrk.headers["Content-Type"] = "application/json"\n'
    printf 'wrk.headers["%s"] = "%s"\n' "$2" "$3"
    printf 'wrk.body = [==[%s]==]\n' "$(cat "$work/body.json")"
    cat <<'EOF'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"p50":%d,"p75":%d,"p90":%d,"p99":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency.max))
end
EOF
  } > "$1"
}

# A private nginx instance: config in $work/<name>/nginx.conf, started with daemon off (so the
# master is our child and its pid is $!). $1 name, $2 worker_processes, $3 the http{} body.
# Sets started_pid.
start_nginx() {
  local name=$1 workers=$2 http_body=$3 dir="$work/$1"
  mkdir -p "$dir/logs" "$dir/tmp"
  cat > "$dir/nginx.conf" <<EOF
# Gatehouse benchmark: $name (generated by bench/gateway_load.sh)
daemon off;
master_process $([ "$workers" = 0 ] && echo off || echo on);
worker_processes $([ "$workers" = 0 ] && echo 1 || echo "$workers");
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events {
  worker_connections 4096;
  multi_accept on;
}
http {
  access_log off;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  keepalive_timeout 75s;
  keepalive_requests 1000000;
  client_body_buffer_size 64k;
  client_max_body_size 10m;
$http_body
}
EOF
  nginx -t -q -e "$dir/logs/error.log" -p "$dir" -c "$dir/nginx.conf" \
    || die "nginx config for $name is invalid: $dir/nginx.conf"
  ${launch[@]+"${launch[@]}"} nginx -e "$dir/logs/error.log" -p "$dir" -c "$dir/nginx.conf" > "$dir/logs/stdout.log" 2>&1 &
  started_pid=$!
  started_pids+=("$started_pid")
}

start_mock() {
  say "mock upstream: nginx on 127.0.0.1:$mock_port (static chat.completion for any path)"
  start_nginx mock 1 "
  server {
    listen 127.0.0.1:$mock_port backlog=4096;
    default_type application/json;
    location = /$tenant/v2.0/.well-known/openid-configuration {
      return 200 '$(cat "$work/entra/discovery.json")';
    }
    location = /$tenant/discovery/v2.0/keys {
      return 200 '$(cat "$work/entra/jwks.json")';
    }
    location / {
      return 200 '$response';
    }
  }"
  mock_pid=$started_pid
  wait_http_200 "http://127.0.0.1:$mock_port/healthz" "$mock_pid" "mock nginx" \
    || die "the mock upstream did not start: $(tail -5 "$work/mock/logs/error.log" 2>/dev/null)"
}

start_nginx_proxy() {
  say "nginx reverse proxy on 127.0.0.1:$nginx_port -> mock (worker_processes $nginx_workers)"
  # Under valgrind, one process (no master): the instructions counted are those of the worker.
  start_nginx proxy "$([ -n "$instructions" ] && echo 0 || echo "$nginx_workers")" "
  upstream mock {
    server 127.0.0.1:$mock_port;
    keepalive 256;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$nginx_port backlog=4096;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering off;
    }
  }"
  nginx_pid=$started_pid
  wait_http_200 "http://127.0.0.1:$nginx_port/healthz" "$nginx_pid" "nginx proxy" \
    || die "the nginx proxy did not start: $(tail -5 "$work/proxy/logs/error.log" 2>/dev/null)"
}

# ---------------------------------------------------------------------------------------------
# the gateway

# Sets gateway_bin, or returns 1 (with gateway_skip_reason) when there is none to measure.
build_gateway() {
  if [ -n "${GATEHOUSE_GATEWAY_BIN:-}" ]; then
    gateway_bin=$GATEHOUSE_GATEWAY_BIN
    [ -x "$gateway_bin" ] || { gateway_skip_reason="GATEHOUSE_GATEWAY_BIN=$gateway_bin is not executable"; return 1; }
    say "gateway: using $gateway_bin"
    return 0
  fi
  say "gateway: cargo build --release --locked -p gatehouse-gateway"
  if ! cargo build --release --locked -p gatehouse-gateway; then
    gateway_skip_reason="cargo build --release -p gatehouse-gateway failed"
    return 1
  fi
  gateway_bin="${CARGO_TARGET_DIR:-$root/target}/release/gatehouse-gateway"
  [ -x "$gateway_bin" ] || { gateway_skip_reason="no binary at $gateway_bin after the build"; return 1; }
}

# Sets floor_bin, or leaves it empty (with a warning) when the floor does not build: the
# gateway's figures do not depend on it.
build_floor() {
  say "floor: cargo build --release --locked -p gatehouse-bench --bin hyper_floor"
  if cargo build --release --locked -p gatehouse-bench --bin hyper_floor; then
    floor_bin="${CARGO_TARGET_DIR:-$root/target}/release/hyper_floor"
  else
    note "WARNING: the floor proxy did not build; it is not measured"
    floor_bin=""
  fi
}

# Starts the floor proxy on $floor_port in front of the mock. Sets floor_pid.
start_floor() {
  say "floor (bare hyper proxy) on 127.0.0.1:$floor_port -> mock"
  ${launch[@]+"${launch[@]}"} "$floor_bin" --listen "127.0.0.1:$floor_port" --upstream "127.0.0.1:$mock_port" \
    > "$work/floor.log" 2>&1 &
  floor_pid=$!
  started_pids+=("$floor_pid")
  wait_http_200 "http://127.0.0.1:$floor_port/healthz" "$floor_pid" "floor"
}

# $1 name, $2 port, $3 extra snapshot YAML, $4 extra server YAML (both indented two spaces).
# Sets gateway_pid.
start_gateway() {
  local name=$1 port=$2 extra_snapshot=${3:-} extra_server=${4:-} dir="$work/$1" hash
  mkdir -p "$dir/state"
  hash=$(printf %s "$api_key" | sha256sum | cut -d' ' -f1)
  cat > "$dir/gateway.yaml" <<EOF
# Gatehouse benchmark config (generated by bench/gateway_load.sh)
server:
  listen: 127.0.0.1:$port
  gateway_id: bench
  state_dir: $dir/state
  log_format: text
  access_log: false   # the nginx proxy runs with access_log off too: like for like
  audit:
$audit_yaml
$extra_server
snapshot:
  version: 1
  capture: $capture_yaml
  subscriptions:
    - id: bench
      primary_key_hash: "sha256:$hash"
  pools:
    - id: bench
      deployments: ["$deployment"]
      members:
        - id: mock
          kind: azure_openai
          endpoint: http://127.0.0.1:$mock_port
$extra_snapshot
EOF
  say "$name on 127.0.0.1:$port -> mock"
  ${launch[@]+"${launch[@]}"} "$gateway_bin" serve --config "$dir/gateway.yaml" > "$dir/gateway.log" 2>&1 &
  gateway_pid=$!
  started_pids+=("$gateway_pid")
  if ! wait_http_200 "http://127.0.0.1:$port/healthz" "$gateway_pid" "$name"; then
    note "gateway log (last 20 lines):"
    tail -20 "$dir/gateway.log" | sed 's/^/     /' >&2
    return 1
  fi
}

# ---------------------------------------------------------------------------------------------
# measuring

# One POST through a target, checked: HTTP 200 and a chat.completion in the answer.
# $1 name, $2 port, $3 the credential header (default: the subscription key).
preflight() {
  local name=$1 port=$2 credential=${3:-"api-key: $api_key"} out="$work/preflight-$1.json" code
  code=$(curl -s -o "$out" -w '%{http_code}' --max-time 5 -X POST \
    -H 'Content-Type: application/json' -H "$credential" \
    --data-binary "@$work/body.json" "http://127.0.0.1:$port$request_path" || true)
  if [ "$code" != 200 ] || ! grep -q '"chat.completion"' "$out"; then
    note "$name: POST $request_path answered HTTP $code: $(head -c 300 "$out" 2>/dev/null)"
    return 1
  fi
  note "$name: POST answers 200 with a chat.completion"
}

# Run wrk; $1 connections, $2 seconds, $3 port, $4 output file.
run_wrk() {
  local c=$1 secs=$2 port=$3 out=$4 threads=$wrk_threads
  [ "$c" -lt "$threads" ] && threads=$c
  wrk -t "$threads" -c "$c" -d "${secs}s" --timeout 5s --latency -s "$wrk_script" \
    "http://127.0.0.1:$port$request_path" > "$out" 2>&1 &
  wrk_pid=$!
  local status=0
  wait "$wrk_pid" || status=$?
  wrk_pid=""
  return "$status"
}

# A gateway's own count of what it adds (the gatehouse_overhead_seconds histogram) at port $1, as
# a JSON list of [upper bound, cumulative count]. Read before and after each measured run of a
# gateway target; the report gives its p50 and p99 beside the added latency wrk measured.
overhead_buckets() {
  curl -s --max-time 5 "http://127.0.0.1:$1/metrics" 2>/dev/null \
    | sed -n 's/^gatehouse_overhead_seconds_bucket{le="\([^"]*\)"} \([0-9]*\)$/\1 \2/p' \
    | awk 'BEGIN { printf "[" } { printf "%s[\"%s\",%s]", (NR > 1 ? "," : ""), $1, $2 } END { printf "]" }'
}

# Measure one target at every concurrency; $1 name, $2 port, $3 proxy pid (empty for direct).
measure_target() {
  local name=$1 port=$2 proxy_pid=${3:-} c
  local proxy_pids mock_pids raw wrk_json
  local cpu0 cpu1 mock0 mock1 host0 host1 hwm_reset hwm rss overhead0 overhead1
  say "measuring $name (warm-up ${warmup}s + ${duration}s per concurrency)"
  mock_pids=$(tree_pids "$mock_pid")
  for c in $concurrency; do
    raw="$work/wrk-$name-c$c.txt"
    proxy_pids=""
    [ -n "$proxy_pid" ] && proxy_pids=$(tree_pids "$proxy_pid")
    hwm_reset=null
    # shellcheck disable=SC2086  # pid lists are meant to split
    [ -n "$proxy_pids" ] && hwm_reset=$(reset_hwm $proxy_pids)

    run_wrk "$c" "$warmup" "$port" "$work/wrk-$name-c$c-warmup.txt" \
      || { broken+=("$name c=$c: wrk warm-up failed"); note "wrk failed: $(tail -3 "$work/wrk-$name-c$c-warmup.txt")"; continue; }

    overhead0=[]
    case $name in gateway*) overhead0=$(overhead_buckets "$port") ;; esac
    # shellcheck disable=SC2086
    { cpu0=$(cpu_ticks $proxy_pids); mock0=$(cpu_ticks $mock_pids); host0=$(host_jiffies); }
    run_wrk "$c" "$duration" "$port" "$raw" \
      || { broken+=("$name c=$c: wrk failed"); note "wrk failed: $(tail -3 "$raw")"; continue; }
    # shellcheck disable=SC2086
    { cpu1=$(cpu_ticks $proxy_pids); mock1=$(cpu_ticks $mock_pids); host1=$(host_jiffies); }
    # shellcheck disable=SC2086
    { hwm=$(status_kb VmHWM $proxy_pids); rss=$(status_kb VmRSS $proxy_pids); }
    overhead1=[]
    case $name in gateway*) overhead1=$(overhead_buckets "$port") ;; esac

    wrk_json=$(sed -n 's/^WRK_JSON //p' "$raw")
    [ -n "$wrk_json" ] || { broken+=("$name c=$c: no result line from wrk"); continue; }
    if [ -n "$proxy_pid" ] && ! kill -0 "$proxy_pid" 2>/dev/null; then
      broken+=("$name c=$c: the proxy process died during the run")
    fi
    cat > "$work/results/$name-c$c.json" <<EOF
{"target":"$name","concurrency":$c,"wrk":$wrk_json,
 "proxy_pids":[$(json_list "$proxy_pids")],
 "proxy_cpu_user_ticks":$([ -n "$proxy_pids" ] && echo $(( ${cpu1% *} - ${cpu0% *} )) || echo null),
 "proxy_cpu_sys_ticks":$([ -n "$proxy_pids" ] && echo $(( ${cpu1#* } - ${cpu0#* } )) || echo null),
 "mock_cpu_ticks":$(( ${mock1% *} + ${mock1#* } - ${mock0% *} - ${mock0#* } )),
 "host_busy_jiffies":$(( ${host1% *} - ${host0% *} )),"host_total_jiffies":$(( ${host1#* } - ${host0#* } )),
 "proxy_vmhwm_kb":$([ -n "$proxy_pids" ] && echo "$hwm" || echo null),
 "proxy_vmrss_kb":$([ -n "$proxy_pids" ] && echo "$rss" || echo null),
 "vmhwm_reset_before_run":$(case $hwm_reset in null) echo null ;; 1) echo true ;; *) echo false ;; esac),
 "overhead_buckets_before":${overhead0:-[]},"overhead_buckets_after":${overhead1:-[]}}
EOF
    note "c=$c: $(python3 "$bench_dir/lib/report.py" line "$work/results/$name-c$c.json")"
  done
}

# Run a target under callgrind for $instructions calls; $1 name, $2 port, $3 pid (valgrind's),
# $4 connections used at once (default 1), $5 the capture variant whose store must hold every
# call before the count stops, so that the audit writer's work for those calls is counted too
# (empty: nothing is recorded). Writes $work/results/$1-instructions.json.
measure_instructions() {
  local name=$1 port=$2 pid=$3 connections=${4:-1} variant=${5:-} out="$work/$1.callgrind" total
  local post=(python3 "$bench_dir/lib/report.py" post --port "$port" --path "$request_path"
              --body "$work/body.json" --header "api-key: $api_key" --connections "$connections")
  say "$name: user-space instructions per call under callgrind ($instructions calls, $connections connection(s))"
  "${post[@]}" --count 300 >/dev/null || { broken+=("$name: a warm-up call was not answered 200"); return; }
  if [ -n "$variant" ] && ! wait_for_records "$variant" 300; then
    broken+=("$name: the store did not take the warm-up calls' records"); return
  fi
  callgrind_control -i on "$pid" >/dev/null
  "${post[@]}" --count "$instructions" >/dev/null || broken+=("$name: a measured call was not answered 200")
  if [ -n "$variant" ] && ! wait_for_records "$variant" $((300 + instructions)); then
    broken+=("$name: the store did not take every measured call's record")
  fi
  callgrind_control -i off "$pid" >/dev/null
  callgrind_control -d "$pid" >/dev/null
  # The dump written by -d is part 1 (callgrind's file name, then ".1").
  local dump
  dump=$(ls -1 "$work/$name".callgrind.*.1 2>/dev/null | tail -1)
  [ -n "$dump" ] || { broken+=("$name: callgrind wrote no dump"); return; }
  cp "$dump" "$out"
  total=$(sed -n 's/^totals: //p' "$out" | head -1)
  [ -n "$total" ] || { broken+=("$name: no totals in $out"); return; }
  note "$name: $total instructions for $instructions calls: $(( total / instructions )) per call"
  printf '{"target":"%s","calls":%s,"connections":%s,"instructions":%s}\n' "$name" "$instructions" \
    "$connections" "$total" > "$work/results/$name-instructions.json"
}

# Waits until the store of capture variant $1 (at `database`) holds at least $2 records; 1 when
# it does not within 5 minutes (the gateway runs under valgrind, tens of times slower).
wait_for_records() {
  local variant=$1 want=$2 waited=0 count
  while [ "$waited" -lt 300 ]; do
    count=$(store_count "$variant" "$database")
    [ "$count" != null ] && [ "$count" -ge "$want" ] && return 0
    sleep 1; waited=$((waited + 1))
  done
  note "the store holds ${count:-no} records of the $want expected"
  return 1
}

# BENCH_INSTRUCTIONS mode: nginx and the key-only gateway under callgrind, their ratio.
instructions_main() {
  command -v valgrind >/dev/null && command -v callgrind_control >/dev/null \
    || die "BENCH_INSTRUCTIONS needs valgrind (apt-get install valgrind)"
  [ "$gateway_status" = pending ] || die "BENCH_INSTRUCTIONS needs the gateway: $gateway_skip_reason"
  launch=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/nginx.callgrind.%p")
  start_nginx_proxy
  measure_instructions nginx "$nginx_port" "$nginx_pid"
  stop_process "$nginx_pid"; forget_pid "$nginx_pid"
  if [ -n "$floor_bin" ]; then
    launch=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/floor.callgrind.%p")
    if start_floor; then
      measure_instructions floor "$floor_port" "$floor_pid"
    else
      broken+=("floor: did not start under valgrind (log: $work/floor.log)")
    fi
    stop_process "$floor_pid"; forget_pid "$floor_pid"
  fi
  launch=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/gateway.callgrind.%p")
  start_gateway gateway "$gateway_port" || die "the gateway did not start under valgrind"
  measure_instructions gateway "$gateway_port" "$gateway_pid"
  stop_process "$gateway_pid"; forget_pid "$gateway_pid"
  # Capture: the audit writer's work is counted with the calls' (for SQLite, the store's too: it
  # runs in the gateway's process). Calls come over several connections at once, as under load,
  # so that the writer takes batches of many records; the key-only gateway is measured the same
  # way as their baseline.
  if [ -n "$capture_variants" ]; then
    local keyonly="gateway-c$capture_connections" variant name
    launch=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/$keyonly.callgrind.%p")
    start_gateway "$keyonly" "$gateway_port" || die "the gateway did not start under valgrind"
    measure_instructions "$keyonly" "$gateway_port" "$gateway_pid" "$capture_connections"
    stop_process "$gateway_pid"; forget_pid "$gateway_pid"
    for variant in $capture_variants; do
      name="gateway-capture-$variant"
      capture_database "$variant" "$name" || continue
      records_everything
      launch=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/$name.callgrind.%p")
      if start_gateway "$name" "$gateway_port"; then
        measure_instructions "$name" "$gateway_port" "$gateway_pid" "$capture_connections" "$variant"
        stop_process "$gateway_pid"; forget_pid "$gateway_pid"
      else
        broken+=("$name: did not start under valgrind (log: $work/$name/gateway.log)")
      fi
      records_nothing
    done
    drop_bench_database
  fi
  launch=()

  say "results"
  local stamp out
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  out="$bench_dir/out/gateway_instructions-$stamp.json"
  python3 - "$work/results" "$out" "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)" <<'PY'
import json, sys
from pathlib import Path
results, out, commit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
runs = {r["target"]: r for r in (json.loads(p.read_text()) for p in results.glob("*-instructions.json"))}
per_call = {name: run["instructions"] / run["calls"] for name, run in runs.items()}
for name, value in per_call.items():
    print(f"{name:8} {value:12,.0f} instructions per call")
ratio = per_call["gateway"] / per_call["nginx"] if {"gateway", "nginx"} <= per_call.keys() else None
if ratio is not None:
    print(f"gateway / nginx: {ratio:.2f} x the user-space instructions per call")
floor = per_call["floor"] / per_call["nginx"] if {"floor", "nginx"} <= per_call.keys() else None
if floor is not None:
    print(f"floor / nginx: {floor:.2f} x (a bare pass-through proxy on the gateway's parts)")
    if "gateway" in per_call:
        print(f"gateway - floor: {per_call['gateway'] - per_call['floor']:+,.0f} instructions a call: the gateway's own work")
capture = {}
baseline = next((name for name in per_call if name.startswith("gateway-c")), None)
for name in sorted(per_call):
    if name.startswith("gateway-capture-") and baseline:
        capture[name] = per_call[name] / per_call[baseline]
        extra = per_call[name] - per_call[baseline]
        print(f"{name} / {baseline}: {capture[name]:.2f} x ({extra:+,.0f} instructions a call for its record)")
out.write_text(json.dumps({"git_commit": commit, "runs": runs, "per_call": per_call, "gateway_over_nginx": ratio, "floor_over_nginx": floor, "capture_over_key_only": capture}, indent=2) + "\n")
print(f"JSON: {out}")
PY
  if [ -s "$work/gateway.callgrind" ] && command -v callgrind_annotate >/dev/null; then
    printf '\nThe gateway'"'"'s costliest functions (own instructions, all calls):\n'
    callgrind_annotate "$work/gateway.callgrind" 2>/dev/null \
      | sed -n '/^Ir  *file:function/,$p' | sed -n '3,27p' \
      | sed -E 's#/root/\.cargo/registry/src/[^/]+/##; s#/rustc/[0-9a-f]+/##; s# \[[^]]*\]$##' | cut -c1-160
  fi
  if [ ${#broken[@]} -gt 0 ]; then
    printf '\nSomething broke:\n' >&2
    printf '  - %s\n' "${broken[@]}" >&2
    exit 1
  fi
}

# The snapshot lines of an identity variant: Entra tokens required, one access rule (and limits).
identity_snapshot() {
  cat <<EOF
  identity:
    require: token
    entra:
      tenants: ["$tenant"]
      audiences: ["$audience"]
      authority_host: http://127.0.0.1:$mock_port
  access_rules:
    - id: bench-group
      grantee: {kind: group, id: bench-group}
      deployments: ["$deployment"]
      operations: [chatcompletions_create]
EOF
}

# Limits that every bench call passes through but none reaches: per-user requests and tokens per
# minute and an hourly token quota.
limits_snapshot() {
  cat <<EOF
  limits:
    - id: bench-per-user
      subject: {kind: each_user}
      deployments: ["$deployment"]
      requests_per_minute: 1000000000
      tokens_per_minute: 1000000000000
      token_quota: {tokens: 1000000000000000, period: hourly}
EOF
}

# Delete the Redis keys this run made (they would expire on their own within the hour).
clean_redis() {
  command -v redis-cli >/dev/null || return 0
  redis-cli -u "$redis_url" --scan --pattern "${redis_prefix}*" 2>/dev/null \
    | xargs -r redis-cli -u "$redis_url" del >/dev/null 2>&1 || true
}

# Calls a target answered: wrk's completed requests over its warm-ups and runs, plus the preflight.
answered_calls() {
  local name=$1
  cat "$work"/wrk-"$name"-c*.txt 2>/dev/null | sed -n 's/^WRK_JSON //p' \
    | python3 -c 'import json,sys; print(1 + sum(json.loads(l)["requests"] for l in sys.stdin))'
}

# Sets `database` to a new, empty store for capture variant $1 (target name $2): a SQLite file
# in the target's directory, or a PostgreSQL database of its own (dropped at exit). Returns 1, with
# the reason in `broken`, when it cannot.
capture_database() {
  local variant=$1 name=$2
  case "$variant" in
    sqlite)
      mkdir -p "$work/$name"
      database="sqlite:$work/$name/audit.db" ;;
    postgres)
      command -v psql >/dev/null || { broken+=("$name: psql is missing"); return 1; }
      drop_bench_database
      psql -q "$postgres_base/postgres" -c "CREATE DATABASE \"$bench_database\"" \
        || { broken+=("$name: could not create database $bench_database"); return 1; }
      made_database=1
      database="$postgres_base/$bench_database" ;;
    *) broken+=("BENCH_CAPTURE: unknown variant $variant"); return 1 ;;
  esac
}

# Start, check and measure the gateway recording into SQLite or PostgreSQL ($1), stop it (which
# flushes its audit queue), and count the records against the calls answered.
measure_capture_variant() {
  local variant=$1 name="gateway-capture-$1" database count answered
  capture_database "$variant" "$name" || return 0
  records_everything
  local waits=null
  if start_gateway "$name" "$identity_port" && preflight "$name" "$identity_port"; then
    measure_target "$name" "$identity_port" "$gateway_pid"
    # Calls that waited for room in a full audit queue (they slow down rather than lose records).
    waits=$(curl -s "http://127.0.0.1:$identity_port/metrics" \
      | sed -n 's/^gatehouse_audit_room_waits_total \([0-9]*\)$/\1/p')
    waits=${waits:-null}
  else
    broken+=("$name: did not start or does not answer the request (log: $work/$name/gateway.log)")
    export BENCH_KEEP_TMP=1
  fi
  stop_process "$gateway_pid"; forget_pid "$gateway_pid"
  answered=$(answered_calls "$name")
  # Under a load above the store's write rate the backlog waits in the gateway's journal; it is
  # replayed at the next start. Start the gateway again, without load, until the store holds every
  # answered call or stops growing (bounded: 5 minutes).
  local previous=-1 still=0 waited=0
  if start_gateway "$name" "$identity_port"; then
    while [ "$waited" -lt 300 ]; do
      count=$(store_count "$variant" "$database")
      [ "$count" != null ] && [ "$count" -ge "$answered" ] && break
      if [ "$count" = "$previous" ]; then still=$((still + 1)); else still=0; fi
      [ "$still" -ge 15 ] && break
      previous=$count
      sleep 1; waited=$((waited + 1))
    done
    stop_process "$gateway_pid"; forget_pid "$gateway_pid"
  fi
  count=$(store_count "$variant" "$database")
  records_nothing
  note "$name: $answered calls answered, ${count} records in the store (journal replayed), $waits calls waited for room in the audit queue"
  printf '{"target":"%s","answered":%s,"records":%s,"room_waits":%s}\n' "$name" "$answered" "${count:-null}" "$waits" \
    > "$work/capture-$variant.json"
}

# Records in the store of capture variant $1 (database URL $2), or null.
store_count() {
  local count
  case "$1" in
    sqlite)   count=$(sqlite3 "${2#sqlite:}" 'SELECT COUNT(*) FROM GatehouseGatewayLogs' 2>/dev/null) ;;
    postgres) count=$(psql -tA "$2" -c 'SELECT COUNT(*) FROM "GatehouseGatewayLogs"' 2>/dev/null) ;;
  esac
  printf '%s\n' "${count:-null}"
}

drop_bench_database() {
  [ -n "$made_database" ] || return 0
  psql -q "$postgres_base/postgres" -c "DROP DATABASE IF EXISTS \"$bench_database\" WITH (FORCE)" >/dev/null 2>&1 || true
  made_database=""
}

# Start, check and measure the gateway as identity variant $1, then stop it.
measure_identity_variant() {
  local variant=$1 name="gateway-$1" extra server=""
  extra=$(identity_snapshot)
  case "$variant" in
    jwt) ;;
    jwt-limits) extra="$extra
$(limits_snapshot)" ;;
    jwt-limits-redis)
      extra="$extra
$(limits_snapshot)"
      server="  limits:
    redis_url: $redis_url
    key_prefix: \"$redis_prefix\"
    on_store_error: fail_closed" ;;
    *) broken+=("BENCH_IDENTITY: unknown variant $variant"); return ;;
  esac
  wrk_script="$work/post-jwt.lua"
  if start_gateway "$name" "$identity_port" "$extra" "$server" \
     && preflight "$name" "$identity_port" "Authorization: Bearer $(cat "$work/entra/token.txt")"; then
    measure_target "$name" "$identity_port" "$gateway_pid"
  else
    broken+=("$name: did not start or does not answer the request (log: $work/$name/gateway.log)")
    export BENCH_KEEP_TMP=1
  fi
  stop_process "$gateway_pid"; forget_pid "$gateway_pid"
  [ "$variant" = jwt-limits-redis ] && clean_redis
  wrk_script="$work/post.lua"
}

# ---------------------------------------------------------------------------------------------

main() {
  ensure_tools
  work=$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-bench.XXXXXX")
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  mkdir -p "$work/results" "$bench_dir/out"

  local gateway_status=skipped
  gateway_skip_reason=""
  gateway_bin=""
  case "$gateway_mode" in
    off) gateway_skip_reason="BENCH_GATEWAY=off" ;;
    auto|on)
      # Build before anything runs, so the compiler does not compete with the measurements.
      if build_gateway; then
        gateway_status=pending
      else
        [ "$gateway_mode" = on ] && broken+=("gateway: $gateway_skip_reason")
        note "WARNING: gateway skipped: $gateway_skip_reason"
      fi ;;
    *) die "BENCH_GATEWAY must be auto, on or off (not $gateway_mode)" ;;
  esac
  build_floor

  # Other load on the machine (a build, tests) makes every figure meaningless: say so.
  local busy_before
  busy_before=$(host_busy_pct 1)
  if [ "$busy_before" -gt 10 ]; then
    note "WARNING: the machine is ${busy_before}% busy before the benchmark starts: the figures will be noisy"
  fi

  read -r mock_port nginx_port gateway_port identity_port floor_port < <(python3 "$bench_dir/lib/report.py" ports 5)
  write_fixtures
  wrk_script="$work/post.lua"
  start_mock
  start_nginx_proxy
  say "checking the targets"
  preflight direct "$mock_port" || die "the mock upstream does not answer the request"
  preflight nginx "$nginx_port" || die "the nginx proxy does not answer the request"

  if [ -n "$instructions" ]; then
    stop_process "$nginx_pid"; forget_pid "$nginx_pid"
    instructions_main
    return
  fi

  measure_target direct "$mock_port"
  measure_target nginx "$nginx_port" "$nginx_pid"
  stop_process "$nginx_pid"; forget_pid "$nginx_pid"

  if [ -n "$floor_bin" ]; then
    if start_floor && preflight floor "$floor_port"; then
      measure_target floor "$floor_port" "$floor_pid"
    else
      broken+=("floor: did not start or does not answer the request (log: $work/floor.log)")
    fi
    stop_process "$floor_pid"; forget_pid "$floor_pid"
  fi

  if [ "$gateway_status" = pending ]; then
    if start_gateway gateway "$gateway_port" && preflight gateway "$gateway_port"; then
      measure_target gateway "$gateway_port" "$gateway_pid"
      gateway_status=measured
    else
      gateway_status=failed
      broken+=("gateway: did not start or does not answer the request (log: $work/gateway/gateway.log)")
      export BENCH_KEEP_TMP=1
    fi
    stop_process "$gateway_pid"; forget_pid "$gateway_pid"
  fi

  local variant
  for variant in $capture_variants; do
    [ "$gateway_status" = measured ] || break
    measure_capture_variant "$variant"
  done
  drop_bench_database
  for variant in $identity_variants; do
    [ "$gateway_status" = measured ] || break
    measure_identity_variant "$variant"
  done

  say "results"
  local stamp out
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  out="$bench_dir/out/gateway_load-$stamp.json"
  cat > "$work/meta.json" <<EOF
{"started_utc":"$stamp","duration_s":$duration,"warmup_s":$warmup,
 "concurrency":[$(json_list "$concurrency")],"wrk_threads_max":$wrk_threads,
 "nginx_proxy_worker_processes":$nginx_workers,"mock_worker_processes":1,
 "request_body_bytes":$(wc -c < "$work/body.json"),"request_path":"$request_path",
 "clk_tck":$(getconf CLK_TCK),"cpus":$(nproc),"host_busy_before_pct":$busy_before,
 "nginx_version":"$(nginx -v 2>&1 | sed 's/^nginx version: //')",
 "wrk_version":"$(wrk -v 2>&1 | head -1 | cut -d' ' -f2)",
 "gateway":{"status":"$gateway_status","skip_reason":"$gateway_skip_reason","binary":"$gateway_bin",
            "git_commit":"$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)",
            "git_dirty":$([ -n "$(git -C "$root" status --porcelain 2>/dev/null)" ] && echo true || echo false)},
 "capture_checks":[$(cat "$work"/capture-*.json 2>/dev/null | paste -sd, -)],
 "problems":$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "${broken[@]+"${broken[@]}"}")}
EOF
  python3 "$bench_dir/lib/report.py" summarize --results "$work/results" --meta "$work/meta.json" --out "$out" \
    || broken+=("some runs had request errors (non-2xx, socket errors or timeouts): their figures are invalid")
  printf '\nJSON: %s\n' "${out#"$root"/}"

  if [ ${#broken[@]} -gt 0 ]; then
    printf '\nSomething broke:\n' >&2
    printf '  - %s\n' "${broken[@]}" >&2
    exit 1
  fi
}

main "$@"

#!/usr/bin/env bash
# Time of each dashboard and audit-search page, p95 over N requests, against a running portal on
# loopback (so the time is the server's, plus a loopback round trip), with the dashboards issue's
# targets: every page p95 under 300 ms, full text under 1.5 s. Start the portal with
# --dev-sign-in and --audit-database pointing at the store to measure (e.g. one filled by
# `store_read --keep`, whose users are user000@contoso.com … and whose callers are in
# 10.20.0.0/13 and 2001:db8::/32), then:
#
#   PORTAL=http://127.0.0.1:3000 N=50 bench/portal_pages.sh
#
# USER_FILTER, IP_FILTER, CIDR_FILTER and TEXT_FILTER choose what the audit searches look for
# (the defaults are user 1 of `store_read`'s generator and its address). The call-detail page
# opens the newest call of the user search, and the next-page entry follows that search's "Next
# page" link (keyset paging). Every audit search and detail view is also written to the activity
# log, as in real use.
set -euo pipefail

PORTAL=${PORTAL:-http://127.0.0.1:3000}
N=${N:-50}
USER_FILTER=${USER_FILTER:-user001@contoso.com}
IP_FILTER=${IP_FILTER:-10.21.0.2}
CIDR_FILTER=${CIDR_FILTER:-10.21.0.0%2F16}
TEXT_FILTER=${TEXT_FILTER:-invoice}

jar=$(mktemp)
trap 'rm -f "$jar"' EXIT
status=$(curl -s -o /dev/null -w '%{http_code}' -c "$jar" -H "Origin: $PORTAL" \
  -d role=Admin "$PORTAL/auth/dev")
if [ "$status" != 303 ]; then
  echo "dev sign-in failed (HTTP $status): start the portal with --dev-sign-in" >&2
  exit 1
fi

# The first result of the user search, and its next page, for the detail and paging entries.
first_page=$(curl -s -b "$jar" "$PORTAL/audit?range=7d&user=$USER_FILTER" || true)
call_path=$(printf '%s' "$first_page" | grep -o 'href="/audit/call?id=[^"]*"' | head -1 | sed 's/^href="//; s/"$//; s/&amp;/\&/g' || true)
next_path=$(printf '%s' "$first_page" | grep -o 'href="/audit?[^"]*" id="audit-next"' | head -1 | sed 's/^href="//; s/" id="audit-next"$//; s/&amp;/\&/g' || true)
if [ -z "$call_path" ] || [ -z "$next_path" ]; then
  echo "the audit search for $USER_FILTER found no call or no next page: is the portal reading the filled store?" >&2
  exit 1
fi

pages=(
  "dashboard 24h|/dashboard?range=24h"
  "dashboard 30d|/dashboard?range=30d"
  "usage by group 7d|/usage?range=7d&dimension=group"
  "usage by user 24h|/usage?range=24h&dimension=user"
  "usage chart 7d|/usage/chart.svg?range=7d&dimension=model"
  "usage CSV 30d|/usage/export.csv?range=30d&dimension=subscription"
  "audit by user 7d|/audit?range=7d&user=$USER_FILTER"
  "audit by user, page 2|$next_path"
  "audit by IP 7d|/audit?range=7d&caller=$IP_FILTER"
  "audit by CIDR 7d|/audit?range=7d&caller=$CIDR_FILTER"
  "audit full text 7d|/audit?range=7d&text=$TEXT_FILTER"
  "audit call detail|$call_path"
)

printf '%-22s %10s %10s %10s  %s\n' page p50_ms p95_ms target_ms verdict
for entry in "${pages[@]}"; do
  name=${entry%%|*}
  path=${entry#*|}
  code=$(curl -s -o /dev/null -w '%{http_code}' -b "$jar" "$PORTAL$path")
  if [ "$code" != 200 ]; then
    echo "$name: HTTP $code" >&2
    exit 1
  fi
  for _ in $(seq "$N"); do
    curl -s -o /dev/null -b "$jar" -w '%{time_total}\n' "$PORTAL$path"
  done | sort -n | awk -v n="$N" -v name="$name" '
    { t[NR] = $1 * 1000 }
    END {
      p50 = int((n * 50 + 99) / 100); p95 = int((n * 95 + 99) / 100)
      target = (name ~ /full text/) ? 1500 : 300
      printf "%-22s %10.1f %10.1f %10d  %s (p95 / target = %.2f)\n", name, t[p50], t[p95], target,
        (t[p95] <= target ? "PASS" : "FAIL"), t[p95] / target
    }'
done

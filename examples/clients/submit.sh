#!/usr/bin/env bash
# Submit an acquisition with curl and poll it until it ends (needs curl and jq).
#   WATCHFOLDER_URL=http://127.0.0.1:8470 WATCHFOLDER_TOKEN=... ./submit.sh /data/drop/jdoe/slide3 jdoe "Brain atlas" "slide 3"
set -euo pipefail
url=${WATCHFOLDER_URL:-http://127.0.0.1:8470}
: "${WATCHFOLDER_TOKEN:?set WATCHFOLDER_TOKEN (watchfolder token new --name NAME --role submit)}"
path=$1 owner=$2 project=$3 dataset=$4

body=$(jq -n --arg p "$path" --arg o "$owner" --arg pr "$project" --arg d "$dataset" \
  '{path: $p, owner: $o, target: {project: $pr, dataset: $d}}')
job=$(curl -sS --fail-with-body -X POST "$url/api/v1/jobs" \
  -H "Authorization: Bearer $WATCHFOLDER_TOKEN" -H "Content-Type: application/json" -d "$body")
id=$(jq -r .id <<<"$job")
echo "job $id queued"
while :; do
  state=$(curl -sS -H "Authorization: Bearer $WATCHFOLDER_TOKEN" "$url/api/v1/jobs/$id" | jq -r .state)
  echo "$state"
  case $state in succeeded|failed|cancelled) break ;; esac
  sleep 5
done
curl -sS -H "Authorization: Bearer $WATCHFOLDER_TOKEN" "$url/api/v1/jobs/$id/log"
[ "$state" = succeeded ]

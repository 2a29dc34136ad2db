#!/usr/bin/env bash
# Classify one image with plain curl: KServe v2 HTTP + Triton's binary tensor extension.
# Usage: curl_infer.sh IMAGE [HOST:PORT] [MODEL]
# Needs only bash, curl and perl (for the 4-byte length prefix).
set -euo pipefail
image=$1
server=${2:-127.0.0.1:8000}
model=${3:-swin_tiny_patch4_window7_224}
size=$(stat -c %s "$image")
# A BYTES element on the wire is a little-endian uint32 length followed by the bytes.
header='{"inputs":[{"name":"image","shape":[1,1],"datatype":"BYTES","parameters":{"binary_data_size":'$((size + 4))'}}],'
# The top 5 as "score:index:label" strings: Triton's classification extension on the probabilities.
header+='"outputs":[{"name":"probabilities","parameters":{"binary_data":false,"classification":5}}]}'
body=$(mktemp)
trap 'rm -f "$body"' EXIT
{ printf '%s' "$header"; perl -e 'print pack("V", $ARGV[0])' "$size"; cat "$image"; } > "$body"
curl -sS --fail-with-body -X POST "http://$server/v2/models/$model/infer" \
  -H "Content-Type: application/octet-stream" \
  -H "Inference-Header-Content-Length: ${#header}" \
  --data-binary @"$body"
echo

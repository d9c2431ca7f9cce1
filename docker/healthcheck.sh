#!/usr/bin/env bash
# Docker HEALTHCHECK of the rollout server: healthy only when GET /health answers ready=true
# (a server that is up but still loading, or paused for a weight update, is not yet healthy).
set -euo pipefail
exec python - <<'PY'
import json, os, sys, urllib.request

url = f"http://127.0.0.1:{os.environ.get('ROLLOUT_PORT', '8000')}/health"
req = urllib.request.Request(url)
token = os.environ.get("ROLLOUT_API_TOKEN", "")
token_file = os.environ.get("ROLLOUT_API_TOKEN_FILE", "/run/secrets/rollout_api_token")
if os.access(token_file, os.R_OK):
    token = open(token_file).read().strip()
if token:
    req.add_header("Authorization", f"Bearer {token}")
try:
    with urllib.request.urlopen(req, timeout=4) as r:
        body = json.load(r)
except Exception as e:  # noqa: BLE001 - any failure is "unhealthy"
    print(f"unhealthy: {e}")
    sys.exit(1)
print(body)
sys.exit(0 if body.get("ready") else 1)
PY

#!/usr/bin/env bash
# Start a local S3 endpoint (SeaweedFS `weed mini`) in the foreground.
#
#   infra/local/start-s3.sh [DATA_DIR] [PORT]      (defaults: ./s3-data, 8333)
#
# Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment if set, otherwise
# fixed local development values. The server enforces them; it prints the variables to export.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DATA_DIR="${1:-./s3-data}"
PORT="${2:-8333}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
exec "$PY" "$ROOT/tests/s3_server.py" --dir "$DATA_DIR" --port "$PORT"

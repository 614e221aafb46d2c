#!/bin/sh
# Docker HEALTHCHECK of the ppg images. One image runs `ppg serve`, Ray nodes and training runs, so
# "healthy" depends on what listens: when the policy server's port (PPG_SERVE_PORT, default 8000)
# accepts connections, its GET /healthz must answer 200 (no auth; the API key guards only /v1);
# when nothing listens there, this container serves nothing and there is nothing to probe.
exec python - "${PPG_SERVE_PORT:-8000}" <<'PY'
import socket
import sys
import urllib.request

port = int(sys.argv[1])
try:
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
except OSError:
    sys.exit(0)  # no policy server in this container
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as e:  # refused, timed out, 5xx
    print(f"unhealthy: GET /healthz on port {port}: {e}", file=sys.stderr)
    sys.exit(1)
PY

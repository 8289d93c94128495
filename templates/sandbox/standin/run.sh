#!/bin/sh
# Entry point of dn.local/sgtm-standin: a tiny HTTP server standing in for the sGTM tagging server
# (and, with RUN_AS_PREVIEW_SERVER=true, the preview server). /healthz answers 200 "ok"; every
# other path answers 200 with a JSON line naming the role and the path.
if [ "$RUN_AS_PREVIEW_SERVER" = "true" ]; then ROLE=preview; else ROLE=tagging; fi
export ROLE
# As PID 1 the shell gets no default SIGTERM action: stop promptly on `docker stop`.
trap 'kill "$server" 2>/dev/null; exit 0' TERM INT
nc -ll -p "${PORT:-8080}" -e /srv/standin/handler.sh &
server=$!
wait "$server"

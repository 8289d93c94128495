#!/bin/sh
# One HTTP request per connection (busybox nc -ll runs this with the socket on stdin/stdout).
CR=$(printf '\r')
read -r line || exit 0
line=${line%"$CR"}
path=${line#* }
path=${path%% *}
len=0
while read -r header; do
    header=${header%"$CR"}
    [ -z "$header" ] && break
    case "$header" in
        [Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Ll][Ee][Nn][Gg][Tt][Hh]:*) len=$(printf %s "${header#*:}" | tr -cd 0-9) ;;
    esac
done
# Read the body so the client never sees a reset for unread data.
[ "${len:-0}" -gt 0 ] && head -c "$len" >/dev/null
case "$path" in
    /healthz|/healthz\?*) body='ok' ;;
    *)
        safe=$(printf %s "$path" | tr -cd 'A-Za-z0-9/._~?=&%-' | head -c 200)
        body="{\"role\":\"$ROLE\",\"path\":\"$safe\",\"host\":\"$(hostname)\"}"
        ;;
esac
printf 'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nX-Dn-Standin: %s\r\nConnection: close\r\n\r\n%s' \
    "${#body}" "$ROLE" "$body"

#!/usr/bin/env bash
# Runs inside `unshare -n` (a network namespace with only loopback): a real Stemme server under
# `strace -f`, one real voice turn from the device client, then SIGTERM. The caller reads the strace log.
# Args: PYTHON OUTDIR WAV PORT
set -u
PY=$1 OUT=$2 WAV=$3 PORT=$4
ip link set lo up
strace -f -qq --seccomp-bpf -s 256 -e trace=connect,sendto,openat,creat,rename,renameat,renameat2,link,symlink \
  -o "$OUT/strace.log" "$PY" -m stemme.cli serve --host 127.0.0.1 --port "$PORT" >"$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 600); do
  if "$PY" - "$PORT" <<'PYEOF' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=2).read()
PYEOF
  kill -0 $SERVER 2>/dev/null || { echo "server died" >&2; exit 3; }
  sleep 1
done
"$PY" -m stemme.cli talk --url "ws://127.0.0.1:$PORT" --fast "$WAV" >"$OUT/talk.jsonl" 2>"$OUT/talk.err"
TALK=$?
sleep 15  # telemetry uploads were seen at 0, +5 and +13 s after the first turn: give them time to show
# SIGTERM to the server itself (strace does not forward it); strace exits with the server's status
kill -TERM "$(pgrep -P $SERVER)"
wait $SERVER
echo "talk=$TALK server=$?" >"$OUT/status"

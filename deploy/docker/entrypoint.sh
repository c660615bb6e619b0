#!/bin/sh
# Container entrypoint: lay out the writable STEMME_HOME from the models in the image (see stemme_home.py),
# then run the command (by default `stemme serve --host 0.0.0.0`) in this process, so it receives SIGTERM.
set -eu
# STEMME_API_KEY_FILE: the API key from a mounted secret file, so the key is not written in the pod's spec
if [ -n "${STEMME_API_KEY_FILE:-}" ] && [ -s "$STEMME_API_KEY_FILE" ]; then
    STEMME_API_KEY=$(cat "$STEMME_API_KEY_FILE")
    export STEMME_API_KEY
fi
if [ -n "${STEMME_IMAGE_HOME:-}" ] && [ "${STEMME_HOME:-$STEMME_IMAGE_HOME}" != "$STEMME_IMAGE_HOME" ]; then
    python3 /opt/stemme/bin/stemme_home.py --link "$STEMME_IMAGE_HOME" "$STEMME_HOME"
fi
exec "$@"

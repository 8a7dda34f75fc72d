#!/bin/sh
# Each node gets its slice as environment variables (see `taskfly validate examples/hello`).
set -eu
echo "$MESSAGE"
echo "node $TASKFLY_NODE_INDEX: city=$CITY greeting=$GREETING"

#!/bin/sh
echo "node $TASKFLY_NODE_INDEX starting"
if [ "$SHOULD_FAIL" = "true" ]; then
  echo "cannot open input: permission denied" >&2
  exit 3
fi
echo "node $TASKFLY_NODE_INDEX done"

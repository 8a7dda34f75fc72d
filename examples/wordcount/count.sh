#!/bin/sh
# FILES is a JSON array such as ["texts/a.txt","texts/d.txt"]; turn it into a word list
# without a JSON tool (file names here hold no quotes or commas). The node's total goes to
# results/count.json, which taskfly.yml's `outputs:` sends back to the daemon.
set -eu
total=0
files=0
for file in $(printf '%s' "$FILES" | tr -d '[]"' | tr ',' ' '); do
  words=$(wc -w < "$file")
  echo "$LABEL: $file has $words words"
  total=$((total + words))
  files=$((files + 1))
done
echo "$LABEL: total $total words"
mkdir -p results
printf '{"node": %s, "files": %s, "words": %s}\n' "$TASKFLY_NODE_INDEX" "$files" "$total" > results/count.json

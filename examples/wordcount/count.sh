#!/bin/sh
# FILES is a JSON array such as ["texts/a.txt","texts/d.txt"]; turn it into a word list
# without a JSON tool (file names here hold no quotes or commas).
set -eu
total=0
for file in $(printf '%s' "$FILES" | tr -d '[]"' | tr ',' ' '); do
  words=$(wc -w < "$file")
  echo "$LABEL: $file has $words words"
  total=$((total + words))
done
echo "$LABEL: total $total words"

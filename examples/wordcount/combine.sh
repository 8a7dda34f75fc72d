#!/bin/sh
# Adds up the word counts the nodes of a wordcount run sent back:
#   sh examples/wordcount/combine.sh DIR
# where DIR holds node-<i>/results/count.json (what `taskfly run` or `taskfly outputs` wrote).
set -eu
dir=${1:?usage: combine.sh DIR (the folder taskfly run or taskfly outputs wrote)}
total=0
nodes=0
for count in "$dir"/node-*/results/count.json; do
  [ -f "$count" ] || { echo "no node-*/results/count.json in $dir" >&2; exit 1; }
  words=$(sed -n 's/.*"words": *\([0-9][0-9]*\).*/\1/p' "$count")
  echo "${count#"$dir"/}: $words words"
  total=$((total + words))
  nodes=$((nodes + 1))
done
echo "total: $total words from $nodes nodes"

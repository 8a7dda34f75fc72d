# Helpers shared by the benchmark scripts (sourced, not run).

# Waits until the program writing to file $1 printed a line `name=value` for name $2; prints
# the value. Fails (showing the file) after 60 s.
read_line() {
  local file="$1" name="$2"
  for _ in $(seq 1 600); do
    if grep -q "^$name=" "$file" 2>/dev/null; then
      grep "^$name=" "$file" | head -n1 | cut -d= -f2-
      return
    fi
    sleep 0.1
  done
  echo "no $name= from $file:" >&2
  cat "$file" >&2
  exit 1
}

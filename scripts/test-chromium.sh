# Sourced by scripts/test.sh: makes sure Debian's chromium and chromium-driver are installed
# (as root, with apt-get) for the dashboard's browser test (tests/it/dashboard.rs), and
# exports their paths (TASKFLY_CHROMIUM, TASKFLY_CHROMEDRIVER) and TASKFLY_REQUIRE_CHROMIUM=1,
# so the test fails, rather than skips, if they are unusable.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  . "$(dirname "${BASH_SOURCE[0]}")/packages.sh"
  install_packages "the dashboard test" chromium chromium-driver
fi
TASKFLY_CHROMIUM="$(command -v chromium)"
TASKFLY_CHROMEDRIVER="$(command -v chromedriver)"
export TASKFLY_CHROMIUM TASKFLY_CHROMEDRIVER
export TASKFLY_REQUIRE_CHROMIUM=1
echo "chromium: $("$TASKFLY_CHROMIUM" --version 2>/dev/null || echo '?'), driver: $TASKFLY_CHROMEDRIVER"

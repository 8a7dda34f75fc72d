# Sourced by scripts/test.sh: makes sure Debian's chromium and chromium-driver are installed
# (as root, with apt-get) for the dashboard's browser test (tests/it/dashboard.rs), and
# exports their paths (TASKFLY_CHROMIUM, TASKFLY_CHROMEDRIVER) and TASKFLY_REQUIRE_CHROMIUM=1,
# so the test fails, rather than skips, if they are unusable.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "the dashboard test needs chromium and chromium-driver (missing here): install them, or run this script as root" >&2
    exit 1
  fi
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends chromium chromium-driver >/dev/null
fi
TASKFLY_CHROMIUM="$(command -v chromium)"
TASKFLY_CHROMEDRIVER="$(command -v chromedriver)"
export TASKFLY_CHROMIUM TASKFLY_CHROMEDRIVER
export TASKFLY_REQUIRE_CHROMIUM=1
echo "chromium: $("$TASKFLY_CHROMIUM" --version 2>/dev/null || echo '?'), driver: $TASKFLY_CHROMEDRIVER"

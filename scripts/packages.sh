# Sourced by the test and benchmark scripts: `install_packages WHAT PACKAGE...` installs Debian
# packages with apt-get, as root or through a password-less sudo; otherwise it fails, naming the
# packages and WHAT needs them. No service a package brings starts on install (a policy-rc.d
# is in place meanwhile, unless the machine has one), and apt waits up to 10 minutes for a
# lock another apt holds. The package lists are read once per shell.
packages_updated=''
install_packages() {
  local what="$1"
  shift
  local sudo=''
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      sudo='sudo -n'
    else
      echo "$what needs the packages $* (missing here): install them, or run this script as root" >&2
      exit 1
    fi
  fi
  local policy_made=''
  if ! [ -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod 755 /usr/sbin/policy-rc.d
    policy_made=1
  fi
  local status=0
  if [ -z "$packages_updated" ]; then
    $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq && packages_updated=1 || status=$?
  fi
  if [ "$status" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      --no-install-recommends "$@" >/dev/null || status=$?
  fi
  if [ -n "$policy_made" ]; then $sudo rm -f /usr/sbin/policy-rc.d; fi
  if [ "$status" != 0 ]; then
    echo "installing $* for $what failed (apt-get exit $status)" >&2
    exit 1
  fi
}

#!/bin/sh
# Make sure a Mosquitto broker is installed (the test suite starts its own).
# Installs it with apt-get when running as root on Debian/Ubuntu; otherwise
# says in one line how to install it and fails.
found() {
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] \
        || [ -x /usr/local/sbin/mosquitto ] || [ -x /opt/homebrew/sbin/mosquitto ]
}
found && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "mpy-blox: installing Mosquitto with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null && found && exit 0
fi
echo "mpy-blox: the tests need Mosquitto: sudo apt-get install mosquitto (Debian, Ubuntu, WSL2) or brew install mosquitto (macOS)" >&2
exit 1

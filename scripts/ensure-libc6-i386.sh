#!/bin/sh
# Make sure the 32-bit MicroPython named by $1 (the tests' 32-bit lane, see
# docs/runtime.md) can run: it needs the i386 C library on an x86_64 machine.
# Installs libc6-i386 with apt-get when running as root on Debian/Ubuntu;
# otherwise says in one line how to install it (or skip the lane) and fails.
bin=${1:?usage: ensure-libc6-i386.sh PATH_OF_32BIT_MICROPYTHON}
runs() {
    "$bin" -c "pass" >/dev/null 2>&1
}
runs && exit 0
if [ ! -x "$bin" ]; then
    echo "mpy-blox: no 32-bit MicroPython at $bin (MPY_BLOX_MICROPYTHON32)" >&2
    exit 1
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "mpy-blox: installing libc6-i386 with apt-get (for $bin)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq libc6-i386 >/dev/null && runs && exit 0
fi
echo "mpy-blox: $bin does not run: sudo apt-get install libc6-i386 (Debian, Ubuntu, WSL2), or set MPY_BLOX_MICROPYTHON32= to skip the 32-bit lane" >&2
exit 1

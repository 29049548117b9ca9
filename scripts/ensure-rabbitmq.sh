#!/bin/sh
# Make sure RabbitMQ (with its MQTT plugin, shipped in Debian's rabbitmq-server)
# is installed: the RabbitMQ tests start their own node. Installs it with apt-get
# when running as root on Debian/Ubuntu; otherwise says in one line how to install
# it and fails. The package's own service is not used (the tests run a node of
# their own on free ports), so it is stopped if the install started it.
found() {
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || [ -x /usr/sbin/rabbitmq-server ] \
        || command -v rabbitmq-server >/dev/null 2>&1
}
found && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "mpy-blox: installing RabbitMQ with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null && found && exit 0
fi
echo "mpy-blox: the RabbitMQ tests need rabbitmq-server: sudo apt-get install rabbitmq-server (Debian, Ubuntu, WSL2) or brew install rabbitmq (macOS)" >&2
exit 1

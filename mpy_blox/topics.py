# The mpypi MQTT topics (DESIGN §4, docs/protocol.md): built here only, by the
# device and by the publisher. Pure: no imports, so CPython imports it as
# mpy_blox.topics and MicroPython 1.22 runs the same code.
#
#   mpypi/channels/{channel}              the update list of a channel
#   mpypi/nodes/{device_id}/cmd           an update list for one device
#   mpypi/nodes/{device_id}/info|status   what a device reports
#   mpypi/packages/wheel/{sha256}         a wheel's bytes
#   mpypi/packages/src/{path}/{sha256}    a source file's bytes
#   mpypi/packages/firmware/{sha256}      a firmware image's bytes
#   {package topic}/{chunk_size}/{k}      chunk k (0, 1, ...) of a chunked package
#   {package topic}/{chunk_size}/hashes   its hash list
#   mpypi/announce                        a request: every device publishes its
#                                         info and status again (not retained)
#
# A list is valid on one topic: its "to" field and the install boot name it
# without the prefix ("channels/stable", "nodes/<id>/cmd": list_to()).
# "+" and "#" as arguments make filters: node_topic("+", "info").
PREFIX = "mpypi/"
ANNOUNCE = "mpypi/announce"  # PREFIX + "announce"


def list_to(topic):
    """The suffix of a full topic, as a list's "to" names it."""
    return topic[len(PREFIX) :] if topic.startswith(PREFIX) else topic


def channel_topic(channel):
    return PREFIX + "channels/" + channel


def node_topic(device_id, leaf):
    """leaf: 'cmd', 'info' or 'status'."""
    return "%snodes/%s/%s" % (PREFIX, device_id, leaf)


def parse_node(topic):
    """(device_id, leaf) of a node topic, or None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] + "/" != PREFIX or parts[1] != "nodes":
        return None
    return parts[2], parts[3]


def package_topic(entry):
    """Where the bytes of a list entry are retained."""
    if entry["type"] in ("wheel", "firmware"):
        return PREFIX + "packages/" + entry["type"] + "/" + entry["pkg_sha256"]
    return "%spackages/src/%s/%s" % (PREFIX, entry["path"], entry["pkg_sha256"])


def chunk_topic(entry, k):
    """Where chunk k of a chunked package is retained; k None: its hash list.
    Under its chunk size: the same package cut two ways is two sets of chunks,
    so a list keeps its chunks when the package is published again in others."""
    return "%s/%d/%s" % (package_topic(entry), entry["chunk_size"], "hashes" if k is None else k)

# What this device checks update lists with: a manifest.Trust built from its
# configuration (update.pubkey, Ed25519; update.key, HMAC). The agent and the
# install boot ask trust(config) when a list arrives, never at boot: an idle
# device keeps the heap.
from mpy_blox.log import get_logger

log = get_logger("update")


def trust(config):
    """The manifest.Trust of this device (docs/protocol.md, "Signed forms")."""
    from mpy_blox.update import manifest

    pubkeys = []
    text = config.get_str("update.pubkey")
    if text:
        try:
            pubkeys.append(manifest.check_pubkey(text))
        except manifest.InvalidUpdate:
            return manifest.Trust(refuse="update.pubkey is not 64 hex digits")
    return manifest.Trust(pubkeys, config.get_str("update.key") or None)


def signed(config):
    """True if this device takes only signed lists (it has an update key)."""
    return bool(config.get_str("update.pubkey") or config.get_str("update.key"))

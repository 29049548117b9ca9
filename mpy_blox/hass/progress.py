# An install's progress on the update entity (mpy_blox/hass/update.py): while
# the update is downloaded and installed, the entity's state topic says
# in_progress with the percentage of the package being downloaded. Hooked into
# Node.on_status by the app (hass.start) and by the install boot, which loads
# this module alone, not the rest of mpy_blox.hass: its heap is the download's.
_BUSY = ("downloading", "verifying", "installing")


def hook(node):
    """Make `node` publish the progress of an install; returns the hook."""
    topic = "%s/update/%s/software/state" % (
        node.config.get_str("hass.discovery_prefix", "homeassistant"),
        node.device_id,
    )

    async def on_status(fields):
        if fields["state"] not in _BUSY and not fields.get("install_boot"):
            return
        total = fields.get("total")
        pct = fields.get("done", 0) * 100 // total if total else None
        payload = '{"in_progress": true, "update_percentage": %s}' % (
            "null" if pct is None else pct
        )
        try:
            await node.client.publish(topic, payload, retain=True)
        except (OSError, AttributeError):  # no link (or no client yet): progress is not worth it
            pass

    node.on_status = on_status
    return on_status

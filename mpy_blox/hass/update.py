# The device's update entity in Home Assistant (MQTT update platform): the
# installed and latest update list of its channel, an install button, and the
# progress of an install.
#
#   state  {"installed_version": "12", "latest_version": "13", "in_progress": false,
#           "update_percentage": null, "release_summary": "channel stable; ..."}
#   command "install" on ~/set: the agent installs the channel's current list,
#           even with update.auto_update false (Agent.install_channel)
#
# Versions are the seq of update lists: the last accepted one (info.seq, "0"
# before any) and the channel's newer one the agent saw but did not install
# (info.available, with auto_update false). While the install boot runs,
# only mpy_blox.hass.progress is loaded: it publishes in_progress and
# update_percentage to this state topic, and the app that boots after it
# publishes the whole state again.
import json

from mpy_blox.hass.entity import Entity

OBJECT_ID = "software"


class UpdateEntity(Entity):
    component = "update"
    has_command = True

    def __init__(self, node, agent):
        super().__init__(
            "Software",
            device_class="firmware",
            entity_category="config",
            payload_install="install",
            title="Mpy-BLOX update list",
        )
        self.node = node
        self.agent = agent
        node.on_info = self.publish  # info changed: a version may have

    def payload(self):
        info = self.node.info_extra
        seq = info.get("seq") or 0
        available = info.get("available") or 0
        last = info.get("last_update") or {}
        summary = "channel %s" % self.node.config.get_str("update.channel", "stable")
        if last.get("result"):
            summary += "; last update %s" % last["result"]
            if last.get("error"):
                summary += ": %s" % last["error"]
        if self.agent is None:
            summary += "; no update agent"
        return json.dumps(
            {
                "installed_version": str(seq),
                "latest_version": str(available if available > seq else seq),
                "in_progress": False,
                "update_percentage": None,
                "release_summary": summary[:255],
            }
        )

    async def command(self, payload):
        if payload != b"install":
            raise ValueError("not install")
        if self.agent is None:
            raise ValueError("no update agent on this device")
        await self.agent.install_channel()

"""Provisioning on a virtual board: ingest, encrypt into NVS, delete; power-cut safety;
a corrupted blob. Real NVS emulation, real flash, real Mosquitto."""

import json

SECRETS = {
    "wlan.ssid": "testnet",
    "wlan.psk": "psk-Secret-1",
    "mqtt.password": "mqtt-Secret-2",
    "update.key": "0011223344556677",
}
AP = {"ssid": "testnet", "psk": "psk-Secret-1"}


def test_provision_json_is_ingested_encrypted_and_deleted_and_survives_reboot(
    app_board, boards, broker, settings_for, watch
):
    board = app_board(settings_for(broker), SECRETS, wlan=AP)
    w = watch(board)
    rb = boards.start(board)
    rb.wait_for(
        r"provision: provisioned mqtt.password, update.key, wlan.psk, wlan.ssid; "
        r"/provision.json removed"
    )
    rb.wait_for(r"wlan: connected to 'testnet'")
    rb.wait_for(r"USER up, psk=psk-Secret-1 password=mqtt-Secret-2")
    w.wait("status", state="online")
    rb.stop()
    assert w.wait("status", state="offline")  # the will: the link died without DISCONNECT
    assert "provision.json" not in board.ls()

    nvs = json.dumps(board.nvs())
    assert "secure" in board.nvs()["mpy_blox"]
    for secret in SECRETS.values():
        assert secret not in nvs and secret.encode().hex() not in nvs

    rb = boards.start(board)  # a reboot reads them back from NVS
    rb.wait_for(r"USER up, psk=psk-Secret-1 password=mqtt-Secret-2")
    assert "provision" not in rb.console()
    info = w.wait("info", boot_count=2)
    assert info["device_id"] == board.device_id


def test_power_cut_after_ingest_before_delete_loses_and_duplicates_nothing(
    app_board, boards, broker, settings_for
):
    board = app_board(settings_for(broker), {"wlan.psk": "psk-Secret-1"})
    # Nothing writes to flash before the file is deleted: the first block write
    # of the boot is that delete, after the secrets are committed to NVS.
    rb = boards.start(board, cut_at=1, once=True)
    rb.wait()
    assert "power-cut" in (board.run_dir / "reason").read_text()
    assert "provision.json" in board.ls()  # not deleted...
    committed = board.nvs()["mpy_blox"]["secure"]  # ...but already stored

    rb = boards.start(board)
    rb.wait_for(r"provisioned wlan.psk; /provision.json removed")
    rb.wait_for(r"USER up, psk=psk-Secret-1 ")
    rb.stop()
    assert "provision.json" not in board.ls()
    # The second ingest found the merge done and wrote nothing: the same blob (same IV).
    assert board.nvs()["mpy_blox"]["secure"] == committed


def test_corrupted_nvs_blob_is_reported_once_and_the_board_runs_unprovisioned(
    app_board, boards, broker, settings_for, watch
):
    board = app_board(settings_for(broker), {"mqtt.password": "pw"})
    rb = boards.start(board)
    rb.wait_for(r"USER up, psk=None password=pw")
    rb.stop()
    nvs = board.nvs()
    blob = bytearray.fromhex(nvs["mpy_blox"]["secure"][1])
    blob[40] ^= 0xFF
    nvs["mpy_blox"]["secure"][1] = blob.hex()
    (board.dir / "nvs.json").write_text(json.dumps(nvs))

    w = watch(board)
    rb = boards.start(board)
    rb.wait_for(r"USER up, psk=None password=None")
    w.wait("status", state="online")
    lines = [l for l in rb.console().splitlines() if "secure store" in l]
    assert len(lines) == 1
    assert "integrity check failed" in lines[0] and "treated as unprovisioned" in lines[0]


def test_a_blob_copied_from_another_device_is_refused(app_board, boards, broker, settings_for):
    first = app_board(settings_for(broker), {"mqtt.password": "pw"})
    rb = boards.start(first)
    rb.wait_for(r"USER up, psk=None password=pw")
    rb.stop()
    second = app_board(settings_for(broker))
    (second.dir / "nvs.json").write_text((first.dir / "nvs.json").read_text())
    rb = boards.start(second)
    rb.wait_for(r"USER up, psk=None password=None")
    assert "integrity check failed: corrupted, or from another device" in rb.console()


def test_a_power_cut_at_any_block_write_of_the_delete_keeps_the_secrets(
    app_board, boards, broker, settings_for
):
    # Count the block writes of provisioning (up to the moment the file is gone)...
    secrets = {"wlan.psk": "psk-Secret-1", "mqtt.password": "pw-2"}
    probe = app_board(settings_for(broker), secrets, user_main=None)
    rb = boards.start(probe)
    rb.wait_for(r"/provision.json removed")
    writes = probe.block_writes()
    rb.stop()
    assert 1 <= writes <= 8
    print(f"provisioning boot: {writes} block write(s) before the file is gone")
    # ...then cut the power at each of them: after the next boot the secrets are
    # stored exactly once and the file is gone, whatever the cut interrupted.
    for cut in range(1, writes + 1):
        board = app_board(settings_for(broker), secrets)
        rb = boards.start(board, cut_at=cut, once=True)
        rb.wait()
        rb = boards.start(board)
        rb.wait_for(r"USER up, psk=psk-Secret-1 password=pw-2")
        rb.stop()
        assert "provision.json" not in board.ls(), cut
        assert sorted(board.nvs()["mpy_blox"]) == ["boot_count", "secure"]

"""weights='imagenet' end to end, against a local server holding a small official-format checkpoint."""

import hashlib
import json
import threading

import numpy as np
import pytest

import tfgcvit
from tfgcvit.weights import download, pretrained
from tfgcvit.weights.download import DownloadError
from tfgcvit.model.gcvit import VARIANTS
from tfgcvit.weights.mapping import keras_weight_table, torch_to_keras_array
from weights_helpers import (
    FIXTURE_MODEL_CONFIG,
    REFERENCE,
    FileServer,
    official_shapes,
    random_state_dict,
    save_training_checkpoint,
)

CHECKPOINT_NAME = "gcvit_1k_xxtiny.pth.tar"
OFFICIAL_PATH = f"/nvidia/GCViT/resolve/main/{CHECKPOINT_NAME}"
MIRROR_PATH = f"/mirror/{CHECKPOINT_NAME}"


@pytest.fixture(scope="module")
def xxtiny_checkpoint(tmp_path_factory):
    """An official-format training checkpoint (with optimizer state) of XXTiny-shaped random weights."""
    pytest.importorskip("torch")
    state = random_state_dict(official_shapes("xxtiny"), seed=3)
    path = save_training_checkpoint(tmp_path_factory.mktemp("xxtiny") / CHECKPOINT_NAME, state)
    data = path.read_bytes()
    return dict(path=path, data=data, sha256=hashlib.sha256(data).hexdigest(), state=state)


@pytest.fixture
def server(xxtiny_checkpoint):
    files = {OFFICIAL_PATH: xxtiny_checkpoint["data"], MIRROR_PATH: xxtiny_checkpoint["data"]}
    with FileServer(files) as running:
        yield running


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TFGCVIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TFGCVIT_MIRROR", raising=False)
    return tmp_path / "home"


def _patch_registry(monkeypatch, **changes):
    """The real registry with the xxtiny/imagenet record changed (url, sha256)."""
    records = pretrained.official_checkpoints()
    for record in records:
        if record["variant"] == "xxtiny" and record["pretrain"] == "imagenet":
            record.update(changes)
    monkeypatch.setattr(pretrained, "official_checkpoints", lambda: [dict(r) for r in records])


def _assert_model_has(model, state):
    rows = keras_weight_table(model)
    assert len(rows) > 100
    for name, variable, layout in rows:
        np.testing.assert_array_equal(np.asarray(variable), torch_to_keras_array(state[name], layout), err_msg=name)


def _assert_same_state(loaded, state):
    expected = {n: v for n, v in state.items() if not n.endswith("relative_position_index")}
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_imagenet_weights_end_to_end(home, server, xxtiny_checkpoint, monkeypatch):
    _patch_registry(monkeypatch, url=server.url(OFFICIAL_PATH), sha256=xxtiny_checkpoint["sha256"])
    model = tfgcvit.GCViTXXTiny()  # weights="imagenet" is the default
    _assert_model_has(model, xxtiny_checkpoint["state"])
    assert server.requests == [OFFICIAL_PATH]
    converted = home / "converted" / "gcvit_1k_xxtiny.npz"
    assert converted.is_file()
    cached = {(i["variant"], i["pretrain"]): i["cached"] for i in pretrained.pretrained_info()}
    assert cached[("xxtiny", "imagenet")] and not cached[("tiny", "imagenet")]

    # Second construction: no network, no re-reading of the checkpoint; a headless model too.
    server.stop()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the converted cache should have been used")

    monkeypatch.setattr(pretrained, "read_checkpoint", must_not_run)
    monkeypatch.setattr(download, "fetch", must_not_run)
    headless = tfgcvit.GCViTXXTiny(include_top=False, pooling="avg")
    _assert_model_has(headless, xxtiny_checkpoint["state"])
    assert not any(name.startswith("head.") for name, _, _ in keras_weight_table(headless))


def test_converted_cache_holds_only_model_tensors(home, server, xxtiny_checkpoint, monkeypatch):
    _patch_registry(monkeypatch, url=server.url(OFFICIAL_PATH), sha256=xxtiny_checkpoint["sha256"])
    state = pretrained.pretrained_state_dict("xxtiny")
    _assert_same_state(state, xxtiny_checkpoint["state"])
    with np.load(home / "converted" / "gcvit_1k_xxtiny.npz") as archive:
        names = set(archive.files)
        assert str(archive["__tfgcvit_source_sha256__"]) == xxtiny_checkpoint["sha256"]
    assert not any("exp_avg" in n or n.endswith("relative_position_index") for n in names)
    weights_bytes = sum(v.nbytes for n, v in xxtiny_checkpoint["state"].items() if not n.endswith("index"))
    converted_bytes = (home / "converted" / "gcvit_1k_xxtiny.npz").stat().st_size
    assert converted_bytes < 1.05 * weights_bytes < 0.5 * len(xxtiny_checkpoint["data"])


def test_mirror_server_replaces_the_official_host(home, server, xxtiny_checkpoint, monkeypatch):
    # The registry keeps the official (unreachable here) URL; the mirror serves the file.
    _patch_registry(monkeypatch, sha256=xxtiny_checkpoint["sha256"])
    monkeypatch.setenv("TFGCVIT_MIRROR", server.url("/mirror"))
    _assert_same_state(pretrained.pretrained_state_dict("xxtiny"), xxtiny_checkpoint["state"])
    assert server.requests == [MIRROR_PATH]


def test_mirror_directory_is_used_in_place(home, xxtiny_checkpoint, monkeypatch):
    _patch_registry(monkeypatch, sha256=xxtiny_checkpoint["sha256"])
    monkeypatch.setenv("TFGCVIT_MIRROR", str(xxtiny_checkpoint["path"].parent))
    _assert_same_state(pretrained.pretrained_state_dict("xxtiny"), xxtiny_checkpoint["state"])
    assert not (home / "checkpoints" / CHECKPOINT_NAME).exists()  # no copy of the big file

    # Hashes still apply to mirrors.
    _patch_registry(monkeypatch, sha256="ab" * 32)
    with pytest.raises(DownloadError, match="expected abab"):
        pretrained.pretrained_state_dict("xxtiny")


def test_unpinned_hash_is_recorded(home, server, xxtiny_checkpoint, monkeypatch, capsys):
    _patch_registry(monkeypatch, url=server.url(OFFICIAL_PATH), sha256=None)
    _assert_same_state(pretrained.pretrained_state_dict("xxtiny"), xxtiny_checkpoint["state"])
    messages = capsys.readouterr().err
    assert "no published sha256" in messages and xxtiny_checkpoint["sha256"] in messages
    assert "CC-BY-NC-SA-4.0" in messages
    sidecar = home / "checkpoints" / (CHECKPOINT_NAME + ".sha256")
    assert sidecar.read_text().split()[0] == xxtiny_checkpoint["sha256"]
    with np.load(home / "converted" / "gcvit_1k_xxtiny.npz") as archive:
        assert str(archive["__tfgcvit_source_sha256__"]) == xxtiny_checkpoint["sha256"]


@pytest.mark.parametrize("mode, sha256, message", [
    ("ok", "0" * 64, "expected 0000"),
    ("corrupt", None, "corrupt|could not|pickle"),
    ("truncate", None, "truncated|closed early"),
    ("error500", None, "HTTP error 500"),
])
def test_bad_downloads_fail_clearly_and_cache_nothing(home, server, xxtiny_checkpoint, monkeypatch,
                                                      mode, sha256, message):
    if mode == "corrupt":
        # A pinned hash catches corruption in transit.
        sha256 = xxtiny_checkpoint["sha256"]
        message = "has sha256 [0-9a-f]{64}, expected " + sha256
    _patch_registry(monkeypatch, url=server.url(OFFICIAL_PATH), sha256=sha256)
    server.modes[OFFICIAL_PATH] = mode
    with pytest.raises(DownloadError, match=message) as error:
        pretrained.pretrained_state_dict("xxtiny")
    assert "TFGCVIT_MIRROR" in str(error.value) and "weights='/path/to/" in str(error.value)
    assert not (home / "checkpoints" / CHECKPOINT_NAME).exists()
    assert not (home / "converted" / "gcvit_1k_xxtiny.npz").exists()
    assert not [p for p in (home / "checkpoints").iterdir() if p.name.endswith(".part")]


def test_concurrent_loaders_download_and_convert_once(home, server, xxtiny_checkpoint, monkeypatch):
    _patch_registry(monkeypatch, url=server.url(OFFICIAL_PATH), sha256=xxtiny_checkpoint["sha256"])
    server.modes[OFFICIAL_PATH] = "slow"
    conversions = []
    original = pretrained.read_checkpoint
    monkeypatch.setattr(pretrained, "read_checkpoint", lambda *a, **k: conversions.append(a) or original(*a, **k))
    results, errors = [], []

    def load():
        try:
            results.append(pretrained.pretrained_state_dict("xxtiny", progress=False))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert len(results) == 2
    for result in results:
        _assert_same_state(result, xxtiny_checkpoint["state"])
    assert server.requests == [OFFICIAL_PATH]
    assert len(conversions) == 1


def test_damaged_or_stale_converted_cache_is_rebuilt(home, server, xxtiny_checkpoint, monkeypatch, capsys):
    _patch_registry(monkeypatch, url=server.url(OFFICIAL_PATH), sha256=xxtiny_checkpoint["sha256"])
    pretrained.pretrained_state_dict("xxtiny")
    converted = home / "converted" / "gcvit_1k_xxtiny.npz"
    converted.write_bytes(converted.read_bytes()[:1000])
    _assert_same_state(pretrained.pretrained_state_dict("xxtiny"), xxtiny_checkpoint["state"])
    assert capsys.readouterr().err.count("unreadable") == 1  # said once, not by each look at the cache

    # A new pinned hash (a new upload) makes the old conversion stale: it is not used, and
    # the checkpoint is fetched again (here the server still has the old file: hash error).
    _patch_registry(monkeypatch, url=server.url(OFFICIAL_PATH), sha256="cd" * 32)
    with pytest.raises(DownloadError, match="expected cdcd"):
        pretrained.pretrained_state_dict("xxtiny")
    assert capsys.readouterr().err.count("converted from another checkpoint file") == 1


def test_which_checkpoints_exist():
    assert pretrained.checkpoint_entry("large", "imagenet21k")["url"].endswith("gcvit_21k_large_224.pth.tar")
    assert pretrained.checkpoint_entry("large", "imagenet")["url"].endswith("gcvit_1k_large.pth.tar")
    assert pretrained.checkpoint_entry("nano", "imagenet")["variant"] == "xxtiny"
    with pytest.raises(ValueError) as error:
        pretrained.checkpoint_entry("large_384", "imagenet")
    assert "no official 'imagenet' weights for GC ViT large_384" in str(error.value)
    assert "'imagenet21k'" in str(error.value)
    with pytest.raises(ValueError, match="'imagenet21k' weights exist for: large, large_384, large_512"):
        pretrained.checkpoint_entry("tiny", "imagenet21k")
    with pytest.raises(ValueError, match="only for the official GC ViT configurations"):
        pretrained.checkpoint_entry(None, "imagenet")
    with pytest.raises(ValueError, match="Unknown GC ViT variant"):
        pretrained.checkpoint_entry("huge", "imagenet")


def test_custom_configuration_has_no_pretrained_weights(home):
    config = dict(FIXTURE_MODEL_CONFIG, include_top=False)
    with pytest.raises(ValueError, match="only for the official GC ViT configurations"):
        tfgcvit.GCViT(weights="imagenet", **config)


def test_pretrained_info(home):
    info = pretrained.pretrained_info()
    assert len(info) == 11
    assert {"variant", "pretrain", "url", "sha256", "size", "top1", "crop_pct", "crop_mode",
            "input_size", "cached", "license"} <= set(info[0])
    assert all(not item["cached"] and item["license"] == "CC-BY-NC-SA-4.0" for item in info)
    assert {(i["variant"], i["pretrain"]) for i in info if i["pretrain"] == "imagenet21k"} == {
        ("large", "imagenet21k"), ("large_384", "imagenet21k"), ("large_512", "imagenet21k")}
    by_variant = {(i["variant"], i["pretrain"]): i for i in info}
    assert by_variant[("large_512", "imagenet21k")]["input_size"] == 512
    assert by_variant[("large_384", "imagenet21k")]["crop_mode"] == "squash"
    # Every constructor's default weights exist.
    for variant, config in VARIANTS.items():
        assert (variant, config["weights"]) in by_variant, variant
        assert by_variant[(variant, config["weights"])]["input_size"] == config["input_size"]


def test_packaged_registry_is_the_reference():
    with open(pretrained.REGISTRY_PATH, encoding="utf-8") as packaged, \
            open(REFERENCE / "official_weights.json", encoding="utf-8") as reference:
        assert json.load(packaged) == json.load(reference)

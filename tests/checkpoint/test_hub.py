"""Checkpoints on the Hugging Face Hub (a local fake Hub): push, pull, revisions, pull requests,
and the Hub's own typed errors reaching the caller."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from oodunleash import OODUnleash
from oodunleash.checkpoint import (
    CONFIG_NAME,
    MASKS_NAME,
    SCORES_NAME,
    TIMM_CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from tests.checkpoint import builders as models
from tests.checkpoint.builders import CLASS_NAMES, PREPROCESSING, TinyNet, assert_same_scoring
from tests.helpers.hub_server import FakeHub, use_fake_hub

TOKEN = "hf_fake_write_token"


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return models.images()


@pytest.fixture(scope="module")
def timm_um() -> OODUnleash:
    return models.timm_um(["energy", "knn"])


@pytest.fixture(scope="module")
def timm_umap() -> OODUnleash:
    return models.timm_umap([])


@pytest.fixture(scope="module")
def custom_umap() -> OODUnleash:
    return models.custom_umap()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with (
        FakeHub(tokens=(TOKEN,)) as server,
        use_fake_hub(server, tmp_path / "hf-cache", monkeypatch, token=TOKEN),
    ):
        yield server


def _fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    """Point the client at an empty cache, as on another machine."""
    from huggingface_hub import constants

    cache = tmp_path / name
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_push_pull_round_trip(timm_um, hub, tmp_path, monkeypatch, images):
    info = timm_um.push_to_hub(
        "me/resnet-um",
        class_names=CLASS_NAMES,
        **PREPROCESSING,
        commit_message="first unleashed model",
        datasets=["fashion_mnist"],
    )
    assert info.oid == hub.repos["me/resnet-um"].refs["main"]
    assert hub.repos["me/resnet-um"].commits[info.oid].message == "first unleashed model"
    files = hub.files("me/resnet-um")
    assert {CONFIG_NAME, WEIGHTS_NAME, TIMM_CONFIG_NAME, SCORES_NAME, "README.md"} <= set(files)
    assert 'from_pretrained("me/resnet-um")' in files["README.md"].decode()

    _fresh_cache(tmp_path, monkeypatch, "cache-b")

    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickles)
    loaded = OODUnleash.from_pretrained("me/resnet-um")
    assert_same_scoring(timm_um, loaded, images)
    assert loaded.class_names == CLASS_NAMES
    assert ("GET", "/me/resnet-um/resolve/" + info.oid + "/README.md") not in hub.requests

    # timm's own hf-hub: loader, through the same client, gets the unleashed model.
    _fresh_cache(tmp_path, monkeypatch, "cache-c")
    plain = timm.create_model("hf-hub:me/resnet-um", pretrained=True).eval()
    timm_um.model.eval()
    with torch.no_grad():
        assert torch.equal(plain(images), timm_um.model(images))


def test_push_custom_model_and_reload_from_cache_offline(custom_umap, hub, images):
    custom_umap.push_to_hub("me/tiny", keep_masks=True, model_kwargs={"width": 4})
    loaded = OODUnleash.from_pretrained("me/tiny", model=TinyNet)
    assert loaded.masks_ is not None and loaded.masks_.is_attached
    assert_same_scoring(custom_umap, loaded, images)

    hub.stop()  # the network goes away: the cached copy still loads
    again = OODUnleash.from_pretrained("me/tiny", model=TinyNet)
    assert_same_scoring(custom_umap, again, images)
    again = OODUnleash.from_pretrained("me/tiny", model=TinyNet, local_files_only=True)
    assert_same_scoring(custom_umap, again, images)


def test_pull_with_network_down_and_no_cache(custom_umap, hub, tmp_path, monkeypatch):
    custom_umap.push_to_hub("me/tiny")
    _fresh_cache(tmp_path, monkeypatch, "empty-cache")
    hub.stop()
    with pytest.raises(LocalEntryNotFoundError):
        OODUnleash.from_pretrained("me/tiny", model=TinyNet())


def test_private_repo_branch_and_pull_request(custom_umap, hub, tmp_path, monkeypatch, images):
    custom_umap.push_to_hub("me/private", private=True)
    assert hub.repos["me/private"].private

    # Anonymous reads of a private repo fail like a missing repo, with a hint about the token.
    monkeypatch.delenv("HF_TOKEN")
    _fresh_cache(tmp_path, monkeypatch, "anon")
    with pytest.raises(RepositoryNotFoundError):
        OODUnleash.from_pretrained("me/private", model=TinyNet())
    loaded = OODUnleash.from_pretrained("me/private", model=TinyNet(), token=TOKEN)
    assert_same_scoring(custom_umap, loaded, images)
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    # A branch is created on demand; main is untouched.
    main_before = hub.repos["me/private"].refs["main"]
    custom_umap.push_to_hub("me/private", revision="dev", commit_message="to dev", keep_masks=True)
    repo = hub.repos["me/private"]
    assert repo.refs["main"] == main_before
    assert repo.commits[repo.refs["dev"]].message == "to dev"
    assert MASKS_NAME in hub.files("me/private", "dev")
    from_dev = OODUnleash.from_pretrained("me/private", model=TinyNet(), revision="dev")
    assert from_dev.masks_ is not None
    assert OODUnleash.from_pretrained("me/private", model=TinyNet()).masks_ is None

    # A pull request leaves main alone and is loadable by its revision.
    info = custom_umap.push_to_hub("me/private", create_pr=True, class_names=CLASS_NAMES)
    assert info.pr_url.endswith("/me/private/discussions/1")
    assert info.pr_revision == "refs/pr/1"
    assert repo.refs["main"] == main_before
    from_pr = OODUnleash.from_pretrained("me/private", model=TinyNet(), revision=info.pr_revision)
    assert from_pr.class_names == CLASS_NAMES
    assert not hasattr(OODUnleash.from_pretrained("me/private", model=TinyNet()), "class_names")

    # Pushing an unchanged checkpoint makes no empty commit.
    commits = len(repo.commits)
    custom_umap.push_to_hub("me/private")
    assert len(repo.commits) == commits


def test_push_removes_stale_checkpoint_files(timm_umap, custom_umap, hub):
    timm_umap.push_to_hub("me/switch", keep_masks=True, **PREPROCESSING)
    assert {MASKS_NAME, TIMM_CONFIG_NAME} <= set(hub.files("me/switch"))
    hub.put_file("me/switch", "notes.md", b"keep me")
    custom_umap.push_to_hub("me/switch")
    files = hub.files("me/switch")
    # A stale timm config.json would make timm misread the new, custom checkpoint.
    assert MASKS_NAME not in files and TIMM_CONFIG_NAME not in files
    assert files["notes.md"] == b"keep me"


def test_missing_repo_revision_and_non_checkpoint(custom_umap, hub):
    with pytest.raises(RepositoryNotFoundError):
        OODUnleash.from_pretrained("me/nothing", model=TinyNet())
    custom_umap.push_to_hub("me/tiny")
    with pytest.raises(RevisionNotFoundError):
        OODUnleash.from_pretrained("me/tiny", model=TinyNet(), revision="v9")
    hub.create_repo("me/plain-timm")
    hub.put_file("me/plain-timm", WEIGHTS_NAME, b"x" * 100)
    with pytest.raises(CheckpointNotFoundError, match="not an oodunleash checkpoint"):
        OODUnleash.from_pretrained("me/plain-timm", model=TinyNet())
    # The refusal came before the weights were downloaded.
    assert not any(p.endswith(f"/plain-timm/resolve/main/{WEIGHTS_NAME}") for _, p in hub.requests)


def test_corrupted_file_on_the_hub(custom_umap, hub, tmp_path, monkeypatch):
    custom_umap.push_to_hub("me/tiny")
    good = hub.files("me/tiny")[WEIGHTS_NAME]
    hub.put_file("me/tiny", WEIGHTS_NAME, good[: len(good) - 10])
    _fresh_cache(tmp_path, monkeypatch, "cache-corrupt")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        OODUnleash.from_pretrained("me/tiny", model=TinyNet())


def test_newer_format_on_the_hub_is_refused_before_download(custom_umap, hub):
    custom_umap.push_to_hub("me/tiny")
    config = json.loads(hub.files("me/tiny")[CONFIG_NAME])
    config["format_version"] = "99.0"
    hub.put_file("me/tiny", CONFIG_NAME, json.dumps(config).encode())
    with pytest.raises(IncompatibleCheckpointError, match="99.0"):
        OODUnleash.from_pretrained("me/tiny", model=TinyNet())
    assert not any(p.endswith(WEIGHTS_NAME) and "/tiny/" in p for _, p in hub.requests)


def _kept_copy(error: BaseException) -> Path:
    """The folder a failed push kept: named in a note on the Hub's own error."""
    copy = error.local_copy
    assert copy.is_dir() and any(str(copy) in note for note in error.__notes__)
    return copy


def test_push_without_token(custom_umap, hub, monkeypatch, images):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HfHubHTTPError, match="401") as info:
        custom_umap.push_to_hub("me/tiny")
    assert "me/tiny" not in hub.repos
    copy = _kept_copy(info.value)
    assert_same_scoring(custom_umap, OODUnleash.from_pretrained(copy, model=TinyNet()), images)
    shutil.rmtree(copy.parent)


def test_push_with_bad_token_keeps_local_copy(custom_umap, hub, images):
    with pytest.raises(HfHubHTTPError, match="401"):
        custom_umap.push_to_hub("me/tiny", token="hf_wrong")
    assert "me/tiny" not in hub.repos


@pytest.mark.parametrize("failure", ["server_down", "dropped_commit"])
def test_push_network_failure_keeps_local_copy(custom_umap, hub, images, failure):
    state = {k: v.clone() for k, v in custom_umap.model.state_dict().items()}
    if failure == "server_down":
        hub.stop()
    else:
        hub.drop_commits = True
    # The HTTP library's own transport error (httpx's ConnectError, RemoteProtocolError...).
    with pytest.raises(Exception, match="refused|disconnected") as info:
        custom_umap.push_to_hub("me/tiny")
    copy = _kept_copy(info.value)
    # The in-memory model is untouched and the kept copy is a complete checkpoint.
    assert all(torch.equal(v, state[k]) for k, v in custom_umap.model.state_dict().items())
    assert_same_scoring(custom_umap, OODUnleash.from_pretrained(copy, model=TinyNet()), images)
    shutil.rmtree(copy.parent)


def test_push_to_given_folder_keeps_it(custom_umap, hub, tmp_path):
    folder = tmp_path / "staged"
    custom_umap.push_to_hub("me/tiny", save_directory=folder)
    assert (folder / CONFIG_NAME).is_file()
    assert hub.files("me/tiny")[CONFIG_NAME] == (folder / CONFIG_NAME).read_bytes()


def test_push_with_card_metadata_the_hub_refuses(custom_umap, hub):
    with pytest.raises(ValueError, match="Invalid metadata") as info:
        custom_umap.push_to_hub("me/tiny", card_data={"datasets": [1, 2]})
    copy = _kept_copy(info.value)
    assert (copy / CONFIG_NAME).is_file()
    shutil.rmtree(copy.parent)
    assert hub.files("me/tiny").keys() == {".gitattributes"}  # nothing was committed

"""Checkpoints: save_pretrained / from_pretrained / push_to_hub, against a local fake Hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from hub_server import FakeHub, use_fake_hub
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import OODUnleash
from oodunleash.hub import (
    CONFIG_NAME,
    FORMAT_VERSION,
    MASKS_NAME,
    SCORES_NAME,
    TIMM_CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    HubAuthError,
    HubConnectionError,
    IncompatibleCheckpointError,
    pack_bits,
    unpack_bits,
)
from oodunleash.scores import get_score

TOKEN = "hf_fake_write_token"
SCORES = ["energy", "msp", "knn", "mahalanobis", "react", "vim"]
CLASS_NAMES = ["cat", "dog", "bird"]


# --------------------------------------------------------------------------- models & data
class TinyNet(nn.Module):
    """A custom (non-timm) classifier: the path that needs model= on loading."""

    def __init__(self, num_classes: int = 3, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _loader(n: int = 48, size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _ood_loader(n: int = 32, size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.rand(n, 3, size, size, generator=g) * 4), batch_size=16)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def timm_um() -> OODUnleash:
    """A fitted UM wrapper of a tiny timm model, with fitted scores and evaluation results."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    unleashed = OODUnleash(model, "um", layers=nn.Conv2d, exclude="stem.*", score="energy")
    unleashed.fit(_loader(), epochs=1, loss_constraint=0.9, progress=False)
    unleashed.fit_scores(_loader(), SCORES, progress=False)
    unleashed.evaluate(_loader(seed=3), {"noise": _ood_loader()}, SCORES, progress=False)
    return unleashed


@pytest.fixture(scope="module")
def timm_umap() -> OODUnleash:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    unleashed = OODUnleash(model, "umap", layers="layer*", keep_ratio=0.7, seed=3)
    unleashed.fit(_loader(), epochs=1, loss_constraint=0.5, progress=False)
    unleashed.fit_scores(_loader(), ["knn", "react"], progress=False)
    return unleashed


@pytest.fixture(scope="module")
def custom_umap() -> OODUnleash:
    torch.manual_seed(0)
    unleashed = OODUnleash(TinyNet(width=4), "umap", keep_ratio=0.6, mask_mode="model")
    unleashed.fit(_loader(), epochs=1, loss_constraint=0.8, progress=False)
    unleashed.fit_scores(_loader(), ["mahalanobis"], progress=False)
    return unleashed


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


def _assert_same_scoring(a: OODUnleash, b: OODUnleash, x: torch.Tensor) -> None:
    """``b`` (loaded) computes exactly what ``a`` (in memory) computes."""
    a.model.eval()
    b.model.eval()
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))
    assert torch.equal(a.score(x), b.score(x))
    assert set(a.fitted_scores_) == set(b.fitted_scores_)
    for name, score in a.fitted_scores_.items():
        # A score's own state_dict may summarise (KNN saves a float16 bank): compare with the
        # score rebuilt from that state in memory, so any loss added by the checkpoint shows.
        reference = get_score(score.name, **score.get_config()).load_state_dict(score.state_dict())
        assert torch.equal(a.score(x, reference), b.score(x, name)), name
        assert _state_equal(b.fitted_scores_[name].state_dict(), score.state_dict()), name


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- bits
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5, 2, 2)])
def test_pack_bits_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.4
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, shape), mask)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(packed, (mask.numel() + 8,))


# --------------------------------------------------------------------------- local folders
def test_save_layout_and_config(timm_um, tmp_path):
    folder = timm_um.save_pretrained(tmp_path / "ckpt", class_names=CLASS_NAMES)
    names = {p.name for p in folder.iterdir()}
    assert names == {CONFIG_NAME, WEIGHTS_NAME, TIMM_CONFIG_NAME, SCORES_NAME, "README.md"}
    assert not any(n.endswith((".bin", ".pth", ".pt", ".pkl")) for n in names)

    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert config["method"] == "um"
    assert config["loss_constraint"] == pytest.approx(timm_um.loss_constraint_)
    assert config["layer_names"] == timm_um.layer_names
    # Module types are recorded by name; the resolved layer names are what round-trips.
    assert config["layers"] == [{"type": "torch.nn.modules.conv.Conv2d"}]
    assert config["exclude"] == ["stem.*"]
    assert config["model"]["architecture"] == "test_resnet"
    assert config["model"]["model_args"]["num_classes"] == 3
    assert config["class_names"] == CLASS_NAMES
    assert config["default_score"] == "energy"
    assert set(config["scores"]) == set(SCORES)
    assert config["scores"]["knn"]["tensors"] == sorted(timm_um.fitted_scores_["knn"].state_dict())
    assert config["results"]["knn"]["noise"]["auroc"] == pytest.approx(
        timm_um.last_results_.to_dict()["knn"]["noise"]["auroc"]
    )
    assert config["training"]["history"] == json.loads(json.dumps(timm_um.history_))

    # timm's own config format.
    timm_config = json.loads((folder / TIMM_CONFIG_NAME).read_text())
    assert timm_config["architecture"] == "test_resnet"
    assert timm_config["num_classes"] == 3
    assert timm_config["label_names"] == CLASS_NAMES
    assert timm_config["pretrained_cfg"]["num_classes"] == 3
    assert not {"url", "hf_hub_id", "file"} & set(timm_config["pretrained_cfg"])

    # Fitted score state, prefixed per score.
    from safetensors.torch import load_file

    stored = load_file(folder / SCORES_NAME)
    knn_state = timm_um.fitted_scores_["knn"].state_dict()
    assert torch.equal(stored["knn/bank"], knn_state["bank"])
    assert torch.equal(
        stored["mahalanobis/precision"],
        timm_um.fitted_scores_["mahalanobis"].state_dict()["precision"],
    )


def test_local_round_trip_timm_um(timm_um, tmp_path, images, monkeypatch):
    folder = timm_um.save_pretrained(tmp_path / "ckpt", class_names=CLASS_NAMES)

    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.load must not be used: checkpoints are safetensors only")

    monkeypatch.setattr(torch, "load", no_pickles)
    loaded = OODUnleash.from_pretrained(folder)

    assert type(loaded.model) is type(timm_um.model)
    assert loaded.model is not timm_um.model
    assert loaded.method == "um" and loaded.is_fitted
    assert loaded.loss_constraint_ == pytest.approx(timm_um.loss_constraint_)
    assert loaded.layer_names == timm_um.layer_names
    assert loaded.history_ == timm_um.history_  # JSON keeps floats exactly
    assert loaded.train_config_.to_dict() == timm_um.train_config_.to_dict()
    assert loaded.class_names == CLASS_NAMES
    assert not loaded.model.training
    assert _state_equal(loaded.model.state_dict(), timm_um.model.state_dict())
    # Fitted scores work without refitting and give identical scores.
    _assert_same_scoring(timm_um, loaded, images)
    assert loaded.last_results_.to_dict() == timm_um.last_results_.to_dict()
    for name, score in timm_um.fitted_scores_.items():
        assert loaded.fitted_scores_[name].get_config() == score.get_config()
        assert _state_equal(loaded.fitted_scores_[name].state_dict(), score.state_dict())


def test_timm_local_dir_gives_the_unleashed_model(timm_umap, tmp_path, images):
    """The folder is a timm checkpoint too: timm alone rebuilds the (baked) unleashed model."""
    folder = timm_umap.save_pretrained(tmp_path / "ckpt", class_names=CLASS_NAMES)
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    exported = timm_umap.export().eval()
    with torch.no_grad():
        assert torch.equal(plain(images), exported(images))
    assert list(plain.pretrained_cfg["label_names"]) == CLASS_NAMES


def test_umap_default_bakes_masks(timm_umap, tmp_path, images):
    folder = timm_umap.save_pretrained(tmp_path / "ckpt")
    assert not (folder / MASKS_NAME).exists()
    loaded = OODUnleash.from_pretrained(folder)
    assert loaded.method == "umap"
    assert loaded.masks_ is None  # a plain sparse model
    baked = timm_umap.export().state_dict()
    assert _state_equal(loaded.model.state_dict(), baked)
    for name in timm_umap.layer_names:
        weight = loaded.model.get_submodule(name).weight
        assert float((weight == 0).float().mean()) == pytest.approx(0.3, abs=0.01)
    _assert_same_scoring(timm_umap, loaded, images)
    assert loaded.sparsity() == pytest.approx(timm_umap.sparsity())


def test_umap_keep_masks_restores_trainable_masks(timm_umap, tmp_path, images):
    folder = timm_umap.save_pretrained(tmp_path / "ckpt", keep_masks=True)
    assert (folder / MASKS_NAME).is_file()
    loaded = OODUnleash.from_pretrained(folder)

    masks = loaded.masks_
    assert masks is not None and masks.is_attached
    assert masks.layer_names == timm_umap.masks_.layer_names
    for name in masks.layer_names:
        assert torch.equal(masks.layer_scores(name), timm_umap.masks_.layer_scores(name))
        assert torch.equal(masks.mask(name), timm_umap.masks_.mask(name))
        # The dense weights are back (pruned values included), so the mask can still move.
        assert torch.equal(
            loaded.model.get_submodule(name)._parameters["weight"],
            timm_umap.model.get_submodule(name)._parameters["weight"],
        )
    _assert_same_scoring(timm_umap, loaded, images)

    # The masks train: the restored scores get the gradients the original ones get (eval mode,
    # so the shared fixture's BatchNorm statistics stay as they are).
    labels = torch.arange(len(images)) % 3
    grads = []
    for wrapper in (timm_umap, loaded):
        wrapper.model.eval()
        wrapper.masks_.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(wrapper.model(images), labels).backward()
        grads.append([wrapper.masks_.layer_scores(n).grad.clone() for n in masks.layer_names])
        wrapper.masks_.zero_grad(set_to_none=True)
        wrapper.model.zero_grad(set_to_none=True)
    assert all(torch.equal(g, h) for g, h in zip(*grads, strict=True))
    assert any(g.abs().sum() > 0 for g in grads[1])

    # model.safetensors stays the baked model, for timm users.
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    timm_umap.model.eval()
    with torch.no_grad():
        assert torch.equal(plain(images), timm_umap.model(images))


def test_custom_model_needs_module_or_factory(custom_umap, tmp_path, images):
    folder = custom_umap.save_pretrained(
        tmp_path / "ckpt", model_kwargs={"num_classes": 3, "width": 4}
    )
    assert not (folder / TIMM_CONFIG_NAME).exists()  # not a timm checkpoint: timm must not try
    with pytest.raises(TypeError, match="custom architecture.*TinyNet"):
        OODUnleash.from_pretrained(folder)

    from_module = OODUnleash.from_pretrained(folder, model=TinyNet(width=4))
    from_factory = OODUnleash.from_pretrained(folder, model=TinyNet)  # called with model_kwargs
    for loaded in (from_module, from_factory):
        assert loaded.mask_mode == "model" and loaded.keep_ratio == 0.6
        _assert_same_scoring(custom_umap, loaded, images)


def test_custom_model_shape_mismatch_names_the_keys(custom_umap, tmp_path):
    folder = custom_umap.save_pretrained(tmp_path / "ckpt")
    wrong = TinyNet(width=6)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        OODUnleash.from_pretrained(folder, model=wrong)
    message = str(info.value)
    assert "conv.weight: checkpoint (4, 3, 3, 3) vs model (6, 3, 3, 3)" in message
    assert "fc.weight" in message and "bn.running_mean" in message
    assert _state_equal(wrong.state_dict(), before)  # nothing was loaded into it

    class Renamed(TinyNet):
        def __init__(self) -> None:
            super().__init__(width=4)
            self.head = self.fc
            del self.fc

        def forward(self, x):
            return self.head(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))

    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint: head\.weight"):
        OODUnleash.from_pretrained(folder, model=Renamed())


def test_save_replaces_stale_files(timm_umap, custom_umap, tmp_path):
    folder = tmp_path / "ckpt"
    timm_umap.save_pretrained(folder, keep_masks=True)
    (folder / "notes.txt").write_text("mine")
    custom_umap.save_pretrained(folder)
    names = {p.name for p in folder.iterdir()}
    assert TIMM_CONFIG_NAME not in names and MASKS_NAME not in names
    assert "notes.txt" in names  # files that are not part of a checkpoint are left alone
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["model"]["source"] == "custom"


def test_unfitted_and_bad_names(tmp_path):
    from oodunleash.wrapper import NotFittedError

    with pytest.raises(NotFittedError):
        OODUnleash(TinyNet()).save_pretrained(tmp_path / "x")
    with pytest.raises(CheckpointNotFoundError, match="No checkpoint folder"):
        OODUnleash.from_pretrained(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointNotFoundError, match="is a file"):
        OODUnleash.from_pretrained(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="not an oodunleash checkpoint"):
        OODUnleash.from_pretrained(tmp_path / "empty")


def test_newer_format_is_refused(custom_umap, tmp_path):
    folder = custom_umap.save_pretrained(tmp_path / "ckpt")
    path = folder / CONFIG_NAME
    config = json.loads(path.read_text())
    major, minor = (int(p) for p in FORMAT_VERSION.split("."))

    config["format_version"] = f"{major + 1}.0"
    config["oodunleash_version"] = "9.0.0"
    path.write_text(json.dumps(config))
    with pytest.raises(IncompatibleCheckpointError, match=r"oodunleash 9\.0\.0.*Upgrade"):
        OODUnleash.from_pretrained(folder, model=TinyNet())

    config["format_version"] = f"{major}.{minor + 1}"
    config["some_future_field"] = {"x": 1}
    path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="newer"):
        OODUnleash.from_pretrained(folder, model=TinyNet())

    path.write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        OODUnleash.from_pretrained(folder, model=TinyNet())


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
@pytest.mark.parametrize("name", [WEIGHTS_NAME, SCORES_NAME])
def test_corrupted_files_are_reported(custom_umap, tmp_path, damage, name):
    folder = custom_umap.save_pretrained(tmp_path / "ckpt")
    path = folder / name
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-3] ^= 0xFF  # inside the tensor data: only the checksum can tell
    else:
        data = bytearray(b"\x00" * 8 + b"not a safetensors header")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=name.replace(".", r"\.")):
        OODUnleash.from_pretrained(folder, model=TinyNet())
    if damage != "flip":
        # Without the checksum, safetensors' own parsing still refuses the file clearly.
        with pytest.raises(CorruptCheckpointError, match="not a readable safetensors file"):
            OODUnleash.from_pretrained(folder, model=TinyNet(), verify=False)


def test_missing_file_is_reported(custom_umap, tmp_path):
    folder = custom_umap.save_pretrained(tmp_path / "ckpt")
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointNotFoundError, match="incomplete.*model.safetensors"):
        OODUnleash.from_pretrained(folder, model=TinyNet())


def test_model_card(timm_um, tmp_path):
    folder = timm_um.save_pretrained(
        tmp_path / "ckpt",
        repo_id="me/unleashed",
        datasets=["fashion_mnist"],
        card_data={"license": "mit"},
    )
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "oodunleash"
    assert {"ood-detection", "unleashing-mask", "timm"} <= set(meta["tags"])
    # trained from scratch: no base model is claimed (timm's hf_hub_id is set regardless)
    assert "base_model" not in meta
    assert meta["datasets"] == ["fashion_mnist"]
    assert meta["license"] == "mit"  # card_data overrides
    assert "auroc" in meta["metrics"] and "fpr95" in meta["metrics"]
    # The results table of the last evaluation, how it was made and how to use it.
    assert timm_um.last_results_.to_markdown().strip() in body
    assert f"{timm_um.loss_constraint_:.4g}" in body
    assert 'OODUnleash.from_pretrained("me/unleashed")' in body
    assert 'timm.create_model("hf-hub:me/unleashed", pretrained=True)' in body


# --------------------------------------------------------------------------- the fake Hub
def test_push_pull_round_trip(timm_um, hub, tmp_path, monkeypatch, images):
    info = timm_um.push_to_hub(
        "me/resnet-um",
        class_names=CLASS_NAMES,
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
    _assert_same_scoring(timm_um, loaded, images)
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
    _assert_same_scoring(custom_umap, loaded, images)

    hub.stop()  # the network goes away: the cached copy still loads
    again = OODUnleash.from_pretrained("me/tiny", model=TinyNet)
    _assert_same_scoring(custom_umap, again, images)
    again = OODUnleash.from_pretrained("me/tiny", model=TinyNet, local_files_only=True)
    _assert_same_scoring(custom_umap, again, images)


def test_pull_with_network_down_and_no_cache(custom_umap, hub, tmp_path, monkeypatch):
    custom_umap.push_to_hub("me/tiny")
    _fresh_cache(tmp_path, monkeypatch, "empty-cache")
    hub.stop()
    with pytest.raises(HubConnectionError, match="me/tiny"):
        OODUnleash.from_pretrained("me/tiny", model=TinyNet())


def test_private_repo_branch_and_pull_request(custom_umap, hub, tmp_path, monkeypatch, images):
    custom_umap.push_to_hub("me/private", private=True)
    assert hub.repos["me/private"].private

    # Anonymous reads of a private repo fail like a missing repo, with a hint about the token.
    monkeypatch.delenv("HF_TOKEN")
    _fresh_cache(tmp_path, monkeypatch, "anon")
    with pytest.raises(CheckpointNotFoundError, match="private or gated"):
        OODUnleash.from_pretrained("me/private", model=TinyNet())
    loaded = OODUnleash.from_pretrained("me/private", model=TinyNet(), token=TOKEN)
    _assert_same_scoring(custom_umap, loaded, images)
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
    timm_umap.push_to_hub("me/switch", keep_masks=True)
    assert {MASKS_NAME, TIMM_CONFIG_NAME} <= set(hub.files("me/switch"))
    hub.put_file("me/switch", "notes.md", b"keep me")
    custom_umap.push_to_hub("me/switch")
    files = hub.files("me/switch")
    # A stale timm config.json would make timm misread the new, custom checkpoint.
    assert MASKS_NAME not in files and TIMM_CONFIG_NAME not in files
    assert files["notes.md"] == b"keep me"


def test_missing_repo_revision_and_non_checkpoint(custom_umap, hub):
    with pytest.raises(CheckpointNotFoundError, match="No Hub repo 'me/nothing'"):
        OODUnleash.from_pretrained("me/nothing", model=TinyNet())
    custom_umap.push_to_hub("me/tiny")
    with pytest.raises(CheckpointNotFoundError, match="no revision 'v9'"):
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


def test_push_without_token(custom_umap, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    before = list(hub.requests)
    with pytest.raises(HubAuthError, match="needs a Hugging Face token"):
        custom_umap.push_to_hub("me/tiny")
    assert hub.requests == before  # refused before any request


def test_push_with_bad_token_keeps_local_copy(custom_umap, hub, images):
    with pytest.raises(HubAuthError) as info:
        custom_umap.push_to_hub("me/tiny", token="hf_wrong")
    assert "me/tiny" not in hub.repos
    copy = info.value.local_copy
    assert copy is not None and str(copy) in str(info.value)
    _assert_same_scoring(custom_umap, OODUnleash.from_pretrained(copy, model=TinyNet()), images)
    shutil.rmtree(copy)


@pytest.mark.parametrize("failure", ["server_down", "dropped_commit"])
def test_push_network_failure_keeps_local_copy(custom_umap, hub, images, failure):
    state = {k: v.clone() for k, v in custom_umap.model.state_dict().items()}
    if failure == "server_down":
        hub.stop()
    else:
        hub.drop_commits = True
    with pytest.raises(HubConnectionError) as info:
        custom_umap.push_to_hub("me/tiny")
    copy = info.value.local_copy
    assert copy is not None and copy.is_dir() and str(copy) in str(info.value)
    # The in-memory model is untouched and the kept copy is a complete checkpoint.
    assert _state_equal(custom_umap.model.state_dict(), state)
    _assert_same_scoring(custom_umap, OODUnleash.from_pretrained(copy, model=TinyNet()), images)
    shutil.rmtree(copy)


def test_push_to_given_folder_keeps_it(custom_umap, hub, tmp_path):
    folder = tmp_path / "staged"
    custom_umap.push_to_hub("me/tiny", save_directory=folder)
    assert (folder / CONFIG_NAME).is_file()
    assert hub.files("me/tiny")[CONFIG_NAME] == (folder / CONFIG_NAME).read_bytes()


def test_custom_registered_score_round_trips(custom_umap, tmp_path, images):
    """A user's own stateful score is stored by registry name + config + tensors, never code."""
    from oodunleash.features import FeatureSet
    from oodunleash.scores import OODScore, register_score, unregister_score

    class CenterDistance(OODScore):
        name = "center_distance_test"
        requires = frozenset({"logits"})
        needs_fit = True
        state_keys = ("center",)

        def __init__(self, power: float = 2.0) -> None:
            self.power = power
            self.center = None

        def fit(self, data: FeatureSet) -> CenterDistance:
            self.center = data.logits.mean(dim=0)
            return self

        def score(self, data: FeatureSet) -> torch.Tensor:
            return -(data.logits - self.center).abs().pow(self.power).sum(dim=1)

    register_score(CenterDistance, overwrite=True)
    try:
        net = TinyNet()
        wrapper = OODUnleash(net, "um").fit(
            _loader(), epochs=1, loss_constraint=0.9, progress=False
        )
        wrapper.fit_scores(_loader(), [CenterDistance(power=3.0)], progress=False)
        folder = wrapper.save_pretrained(tmp_path / "ckpt")
        config = json.loads((folder / CONFIG_NAME).read_text())
        assert config["scores"]["center_distance_test"]["config"] == {"power": 3.0}
        loaded = OODUnleash.from_pretrained(folder, model=TinyNet())
        assert loaded.fitted_scores_["center_distance_test"].power == 3.0
        _assert_same_scoring(wrapper, loaded, images)
    finally:
        unregister_score("center_distance_test")
    # Without the score registered, loading says what to do instead of importing anything.
    with pytest.raises(IncompatibleCheckpointError, match="register_score"):
        OODUnleash.from_pretrained(folder, model=TinyNet())


def test_push_with_card_metadata_the_hub_refuses(custom_umap, hub):
    from oodunleash import HubError

    with pytest.raises(HubError, match="Invalid metadata") as info:
        custom_umap.push_to_hub("me/tiny", card_data={"datasets": [1, 2]})
    assert info.value.local_copy is not None and (info.value.local_copy / CONFIG_NAME).is_file()
    shutil.rmtree(info.value.local_copy)
    assert hub.files("me/tiny").keys() == {".gitattributes"}  # nothing was committed


def test_only_rank_zero_writes_or_uploads(tmp_path, monkeypatch):
    import oodunleash.hub as hub_module

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    data = [(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,)))]
    unleashed = OODUnleash(model).fit(data, epochs=1, loss_constraint=0.5, progress=False)
    monkeypatch.setattr(hub_module, "is_main_process", lambda: False)
    folder = unleashed.save_pretrained(tmp_path / "ckpt")
    assert folder == tmp_path / "ckpt" and not folder.exists()
    assert unleashed.push_to_hub("me/model", token="hf_fake") is None

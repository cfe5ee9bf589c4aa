"""Checkpoints in a local folder: layout, round trips, masks, custom models, model card,
post-hoc-only wrappers, compiled models and recorded preprocessing."""

from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch
import yaml
from torch import nn

from oodunleash import OODUnleash
from oodunleash.checkpoint import (
    CONFIG_NAME,
    FORMAT_VERSION,
    MASKS_NAME,
    SCORES_NAME,
    TIMM_CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointMismatchError,
    IncompatibleCheckpointError,
    pack_bits,
    unpack_bits,
)
from tests.checkpoint import builders as models
from tests.checkpoint.builders import (
    CLASS_NAMES,
    PREPROCESSING,
    TinyNet,
    assert_same_scoring,
    loader,
)
from tests.helpers.toys import same_state

SCORES = ["energy", "msp", "knn", "mahalanobis", "react", "vim"]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return models.images()


@pytest.fixture(scope="module")
def timm_um() -> OODUnleash:
    return models.timm_um(SCORES, evaluate=True)


@pytest.fixture(scope="module")
def timm_umap() -> OODUnleash:
    return models.timm_umap(["knn", "react"])


@pytest.fixture(scope="module")
def custom_umap() -> OODUnleash:
    return models.custom_umap()


# --------------------------------------------------------------------------- bits
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5, 2, 2)])
def test_pack_bits_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.4
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, shape), mask)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(packed, (mask.numel() + 8,))


# --------------------------------------------------------------------------- layout
def test_save_layout_and_config(timm_um, tmp_path):
    folder = timm_um.save_pretrained(tmp_path / "ckpt", class_names=CLASS_NAMES, **PREPROCESSING)
    names = {p.name for p in folder.iterdir()}
    assert names == {CONFIG_NAME, WEIGHTS_NAME, TIMM_CONFIG_NAME, SCORES_NAME, "README.md"}
    assert not list(tmp_path.glob(".*"))  # no staging folder left beside it

    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert config["params"]["method"] == "um" and config["params"]["score"] == "energy"
    assert config["fitted"] is True
    assert config["loss_constraint"] == pytest.approx(timm_um.loss_constraint_)
    assert config["layer_names"] == timm_um.layer_names
    assert config["model"]["architecture"] == "test_resnet"
    assert config["model"]["model_args"]["num_classes"] == 3
    assert config["class_names"] == CLASS_NAMES
    assert set(config["scores"]) == set(SCORES)
    assert config["scores"]["knn"]["tensors"] == sorted(timm_um.fitted_scores_["knn"].state_dict())
    assert config["results"]["knn"]["noise"]["auroc"] == pytest.approx(
        timm_um.last_results_.to_dict()["knn"]["noise"]["auroc"]
    )
    assert config["training"]["history"] == json.loads(json.dumps(timm_um.history_))
    assert config["preprocessing"]["input_size"] == [3, 16, 16]

    timm_config = json.loads((folder / TIMM_CONFIG_NAME).read_text())
    assert timm_config["architecture"] == "test_resnet"
    assert timm_config["num_classes"] == 3
    assert timm_config["label_names"] == CLASS_NAMES
    assert timm_config["pretrained_cfg"]["num_classes"] == 3
    assert not {"url", "hf_hub_id", "file", "tag", "license"} & set(timm_config["pretrained_cfg"])

    from safetensors.torch import load_file

    stored = load_file(folder / SCORES_NAME)
    assert torch.equal(stored["knn/bank"], timm_um.fitted_scores_["knn"].state_dict()["bank"])


def test_local_round_trip_timm_um(timm_um, tmp_path, images, monkeypatch):
    folder = timm_um.save_pretrained(tmp_path / "ckpt", class_names=CLASS_NAMES, **PREPROCESSING)

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
    assert same_state(loaded.model.state_dict(), timm_um.model.state_dict())
    assert_same_scoring(timm_um, loaded, images)
    assert loaded.last_results_.to_dict() == timm_um.last_results_.to_dict()
    for name, score in timm_um.fitted_scores_.items():
        assert loaded.fitted_scores_[name].get_config() == score.get_config()


def test_timm_local_dir_gives_the_unleashed_model(timm_umap, tmp_path, images):
    """The folder is a timm checkpoint too: timm alone rebuilds the (baked) unleashed model."""
    folder = timm_umap.save_pretrained(tmp_path / "ckpt", class_names=CLASS_NAMES, **PREPROCESSING)
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    exported = timm_umap.export().eval()
    with torch.no_grad():
        assert torch.equal(plain(images), exported(images))
    assert list(plain.pretrained_cfg["label_names"]) == CLASS_NAMES


def test_umap_default_bakes_masks(timm_umap, tmp_path, images):
    folder = timm_umap.save_pretrained(tmp_path / "ckpt", **PREPROCESSING)
    assert not (folder / MASKS_NAME).exists()
    loaded = OODUnleash.from_pretrained(folder)
    assert loaded.method == "umap"
    assert loaded.masks_ is None  # a plain sparse model
    assert same_state(loaded.model.state_dict(), timm_umap.export().state_dict())
    for name in timm_umap.layer_names:
        weight = loaded.model.get_submodule(name).weight
        assert float((weight == 0).float().mean()) == pytest.approx(0.3, abs=0.01)
    assert_same_scoring(timm_umap, loaded, images)
    assert loaded.sparsity() == pytest.approx(timm_umap.sparsity())


def test_umap_keep_masks_restores_trainable_masks(timm_umap, tmp_path, images):
    folder = timm_umap.save_pretrained(tmp_path / "ckpt", keep_masks=True, **PREPROCESSING)
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
            loaded.model.state_dict()[f"{name}.weight"],
            timm_umap.model.state_dict()[f"{name}.weight"],
        )
    assert_same_scoring(timm_umap, loaded, images)

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
        assert_same_scoring(custom_umap, loaded, images)


def test_custom_model_shape_mismatch_names_the_keys(custom_umap, tmp_path):
    folder = custom_umap.save_pretrained(tmp_path / "ckpt")
    wrong = TinyNet(width=6)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        OODUnleash.from_pretrained(folder, model=wrong)
    message = str(info.value)
    assert "conv.weight: checkpoint (4, 3, 3, 3) vs model (6, 3, 3, 3)" in message
    assert "fc.weight" in message and "bn.running_mean" in message
    assert same_state(wrong.state_dict(), before)  # nothing was loaded into it

    class Renamed(TinyNet):
        def __init__(self) -> None:
            super().__init__(width=4)
            self.head = self.fc
            del self.fc

        def forward(self, x):
            return self.head(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))

    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint: head\.weight"):
        OODUnleash.from_pretrained(folder, model=Renamed())


def test_save_replaces_its_own_files_and_keeps_the_users(timm_umap, custom_umap, tmp_path):
    folder = tmp_path / "ckpt"
    timm_umap.save_pretrained(folder, keep_masks=True, **PREPROCESSING)
    (folder / "notes.txt").write_text("mine")
    custom_umap.save_pretrained(folder)
    names = {p.name for p in folder.iterdir()}
    assert TIMM_CONFIG_NAME not in names and MASKS_NAME not in names
    assert (folder / "notes.txt").read_text() == "mine"  # not part of a checkpoint: kept
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["model"]["source"] == "custom"


def test_newer_format_is_refused_and_newer_minor_warns(custom_umap, tmp_path):
    folder = custom_umap.save_pretrained(tmp_path / "ckpt")
    path = folder / CONFIG_NAME
    config = json.loads(path.read_text())
    major, minor = (int(p) for p in FORMAT_VERSION.split("."))

    config["format_version"] = f"{major + 1}.0"
    config["oodunleash_version"] = "9.0.0"
    path.write_text(json.dumps(config))
    with pytest.raises(IncompatibleCheckpointError, match=r"oodunleash 9\.0\.0.*Upgrade"):
        OODUnleash.from_pretrained(folder, model=TinyNet(), verify=False)

    config["format_version"] = f"{major}.{minor + 1}"
    config["some_future_field"] = {"x": 1}
    path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="newer"):
        OODUnleash.from_pretrained(folder, model=TinyNet())


def test_model_card(timm_um, tmp_path):
    folder = timm_um.save_pretrained(
        tmp_path / "ckpt",
        repo_id="me/unleashed",
        datasets=["fashion_mnist"],
        card_data={"license": "mit"},
        **PREPROCESSING,
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
    assert timm_um.last_results_.to_markdown().strip() in body
    assert f"{timm_um.loss_constraint_:.4g}" in body
    assert "| Masked layers | " in body and "| Preprocessing | input_size [3, 16, 16]" in body
    assert 'OODUnleash.from_pretrained("me/unleashed")' in body
    assert 'timm.create_model("hf-hub:me/unleashed", pretrained=True)' in body


def test_custom_registered_score_round_trips(tmp_path, images):
    """A user's own stateful score is stored by registry name + config + tensors, never code."""
    from oodunleash.features.collect import FeatureSet
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
        wrapper = OODUnleash(TinyNet(), "um", constraint=0.9).fit(
            loader(), epochs=1, progress=False
        )
        wrapper.fit_scores(loader(), [CenterDistance(power=3.0)], progress=False)
        folder = wrapper.save_pretrained(tmp_path / "ckpt")
        config = json.loads((folder / CONFIG_NAME).read_text())
        assert config["scores"]["center_distance_test"]["config"] == {"power": 3.0}
        loaded = OODUnleash.from_pretrained(folder, model=TinyNet())
        assert loaded.fitted_scores_["center_distance_test"].power == 3.0
        assert_same_scoring(wrapper, loaded, images)
    finally:
        unregister_score("center_distance_test")
    # Without the score registered, loading says what to do instead of importing anything.
    with pytest.raises(IncompatibleCheckpointError, match="register_score"):
        OODUnleash.from_pretrained(folder, model=TinyNet())


def test_only_rank_zero_writes_or_uploads(tmp_path, monkeypatch):
    import oodunleash.checkpoint.hub_io as hub_io
    import oodunleash.checkpoint.save as save_module

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    data = [(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,)))]
    unleashed = OODUnleash(model, constraint=0.5).fit(data, epochs=1, progress=False)
    monkeypatch.setattr(save_module, "is_main_process", lambda: False)
    monkeypatch.setattr(hub_io, "is_main_process", lambda: False)
    folder = unleashed.save_pretrained(tmp_path / "ckpt")
    assert folder == tmp_path / "ckpt" and not folder.exists()
    assert unleashed.push_to_hub("me/model", token="hf_fake") is None


# --------------------------------------------------------------------------- issue 21
def test_post_hoc_only_wrapper_saves_and_loads_its_scores(tmp_path, images):
    """fit_scores without fit: a baseline with its KNN bank can be shared."""
    torch.manual_seed(0)
    baseline = OODUnleash(TinyNet(), "um")
    baseline.fit_scores(loader(), ["knn", "vim"], progress=False)
    assert not baseline.is_fitted
    folder = baseline.save_pretrained(tmp_path / "baseline")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["fitted"] is False and config["loss_constraint"] is None
    assert "not fitted (post-hoc scores only)" in (folder / "README.md").read_text()

    loaded = OODUnleash.from_pretrained(folder, model=TinyNet)
    assert not loaded.is_fitted
    assert sorted(loaded.fitted_scores_) == ["knn", "vim"]
    assert_same_scoring(baseline, loaded, images)

    from oodunleash import NotFittedError

    with pytest.raises(NotFittedError, match="fit_scores"):
        OODUnleash(TinyNet()).save_pretrained(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_timm_preprocessing_round_trip_from_scratch(tmp_path):
    """A timm model trained from scratch at 32 px with mean/std 0.5: timm's own data config of
    the reloaded model is what was saved, and nothing of the ImageNet pretrained_cfg is."""
    from timm.data import resolve_data_config, resolve_model_data_config

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3, channels=(8, 8, 8, 8), stem_width=8)
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))]
    unleashed = OODUnleash(model, "um", constraint=0.5).fit(data, epochs=1, progress=False)
    folder = unleashed.save_pretrained(
        tmp_path / "ckpt", input_size=(3, 32, 32), mean=0.5, std=0.5, interpolation="bilinear"
    )
    pretrained_cfg = json.loads((folder / TIMM_CONFIG_NAME).read_text())["pretrained_cfg"]
    assert not {"tag", "license", "origin_url", "paper_ids", "test_input_size"} & set(
        pretrained_cfg
    )
    assert pretrained_cfg["input_size"] == [3, 32, 32]

    reloaded = OODUnleash.from_pretrained(folder).model
    for resolved in (resolve_data_config({}, model=reloaded), resolve_model_data_config(reloaded)):
        assert resolved["input_size"] == (3, 32, 32)
        assert resolved["mean"] == (0.5, 0.5, 0.5) and resolved["std"] == (0.5, 0.5, 0.5)
        assert resolved["interpolation"] == "bilinear"
    assert reloaded.pretrained_cfg.get("tag") is None
    # timm alone reads it too.
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert resolve_data_config({}, model=plain)["input_size"] == (3, 32, 32)


def test_timm_preprocessing_from_the_users_data_config(tmp_path):
    from timm.data import resolve_data_config

    model = timm.create_model("test_resnet", num_classes=3)
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,)))]
    unleashed = OODUnleash(model, "um", constraint=0.5).fit(data, epochs=1, progress=False)
    data_config = resolve_data_config({"input_size": (3, 16, 16), "mean": (0.1, 0.2, 0.3)})
    folder = unleashed.save_pretrained(tmp_path / "ckpt", data_config=data_config, std=0.25)
    resolved = resolve_data_config({}, model=OODUnleash.from_pretrained(folder).model)
    assert resolved["input_size"] == (3, 16, 16)
    assert resolved["mean"] == (0.1, 0.2, 0.3) and resolved["std"] == (0.25, 0.25, 0.25)


def test_timm_save_without_preprocessing_warns_and_claims_nothing(tmp_path):
    model = timm.create_model("test_resnet", num_classes=3)
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,)))]
    unleashed = OODUnleash(model, "um", constraint=0.5).fit(data, epochs=1, progress=False)
    with pytest.warns(UserWarning, match="input_size=, mean=, std="):
        folder = unleashed.save_pretrained(tmp_path / "ckpt")
    pretrained_cfg = json.loads((folder / TIMM_CONFIG_NAME).read_text())["pretrained_cfg"]
    assert not {"mean", "std", "tag", "license"} & set(pretrained_cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # base_model: fine-tuned, the source's preprocessing holds
        folder = unleashed.save_pretrained(tmp_path / "tuned", base_model="timm/test_resnet")
    pretrained_cfg = json.loads((folder / TIMM_CONFIG_NAME).read_text())["pretrained_cfg"]
    assert pretrained_cfg["mean"] == list(model.pretrained_cfg["mean"])


def test_compiled_model_saves_the_plain_module(tmp_path, images):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    compiled = torch.compile(model)
    unleashed = OODUnleash(model, "um", constraint=0.9)
    unleashed.fit(loader(), epochs=1, progress=False)
    unleashed.model = compiled  # what a user who compiled after wrapping holds
    folder = unleashed.save_pretrained(tmp_path / "ckpt", **PREPROCESSING)
    from safetensors.torch import load_file

    assert not any(k.startswith("_orig_mod.") for k in load_file(folder / WEIGHTS_NAME))
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["model"]["class"].endswith("ResNet") and (folder / TIMM_CONFIG_NAME).is_file()
    loaded = OODUnleash.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(images), model.eval()(images))


def test_compiled_state_into_a_plain_model(tmp_path):
    """A state_dict with `_orig_mod.` keys loads into the plain model (the prefix is stripped);
    a partial one is refused with a message that names the prefix."""
    from oodunleash.checkpoint.tensors import load_model_state

    plain = TinyNet()
    source = TinyNet()
    state = {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}
    load_model_state(plain, state, "test")
    assert same_state(plain.state_dict(), source.state_dict())
    del state["_orig_mod.fc.bias"]
    with pytest.raises(CheckpointMismatchError, match="_orig_mod"):
        load_model_state(TinyNet(), {**state, "fc.bias": torch.zeros(3)}, "test")


def test_wrapper_around_a_compiled_model_saves_plain_names(tmp_path, images):
    """A UMAP wrapper made around ``torch.compile(model)``: weights, masked layers and mask
    tensors are saved without ``_orig_mod.``, and load into the plain architecture."""
    torch.manual_seed(0)
    plain = TinyNet()
    unleashed = OODUnleash(
        torch.compile(plain, backend="eager"), "umap", keep_ratio=0.6, constraint=0.5
    )
    unleashed.fit(loader(), epochs=1, progress=False)
    folder = unleashed.save_pretrained(tmp_path / "ckpt", keep_masks=True)
    from safetensors.torch import load_file

    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["model"]["class"].endswith("TinyNet")
    assert config["layer_names"] == ["conv", "fc"]
    for name in (WEIGHTS_NAME, MASKS_NAME):
        assert not any("_orig_mod" in k for k in load_file(folder / name)), name
    loaded = OODUnleash.from_pretrained(folder, model=TinyNet)
    assert loaded.masks_ is not None
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(images), unleashed.model.eval()(images))

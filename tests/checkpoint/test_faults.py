"""The checkpoint part of the bad-input and fault catalogue (issue 19): tampered configs, damaged
files, bad paths, files the library did not write, and a process killed at every step of a save.

Every case asserts the error type, that the message names the problem (and the fix), and that
nothing saved was changed or lost.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

import oodunleash.checkpoint.folder as folder_module
from oodunleash import OODUnleash
from oodunleash.checkpoint import (
    CONFIG_NAME,
    MASKS_NAME,
    SCORES_NAME,
    WEIGHTS_NAME,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
)
from tests.checkpoint.builders import TinyNet, tiny_umap
from tests.helpers.toys import same_state

TESTS = Path(__file__).resolve().parent
FIXTURE_V1 = TESTS / "fixtures" / "checkpoint_v0_1" / "sequential_umap"


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what "nothing changed" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def old() -> OODUnleash:
    return tiny_umap(1)


@pytest.fixture(scope="module")
def new() -> OODUnleash:
    return tiny_umap(2)


@pytest.fixture(scope="module")
def pristine(old, tmp_path_factory) -> Path:
    return old.save_pretrained(tmp_path_factory.mktemp("pristine") / "ckpt", keep_masks=True)


@pytest.fixture
def saved(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


# --------------------------------------------------------------------------- tampered configs
TAMPERED = {
    # field: (path in the config, bad value)
    "xi negative": ("loss_constraint", -5),
    "xi zero": ("loss_constraint", 0),
    "xi string": ("loss_constraint", "0.5"),
    "xi nan": ("loss_constraint", math.nan),
    "xi infinite": ("loss_constraint", math.inf),
    "history string": ("training.history", "abc"),
    "history numbers": ("training.history", [1, 2]),
    "history text value": ("training.history", [{"loss": "low"}]),
    "train config string": ("training.config", "sgd"),
    "training list": ("training", []),
    "unknown method": ("params.method", "dense"),
    "params list": ("params", ["um"]),
    "layer names string": ("layer_names", "conv"),
    "layer names ints": ("layer_names", [1, 2]),
    "class names string": ("class_names", "cat"),
    "class names ints": ("class_names", [1, 2, 3]),
    "mask storage": ("masks.storage", "pickle"),
    "mask sparsity": ("masks.sparsity", 2.0),
    "mask keep ratio": ("masks.keep_ratio", 0),
    "mask mode": ("masks.mode", "row"),
    "model source": ("model.source", "pickle"),
    "model class": ("model.class", 5),
    "model args": ("model.model_args", "width=4"),
    "score entry": ("scores.knn", {"name": 3}),
    "score tensors": ("scores.knn.tensors", "bank"),
    "scores list": ("scores", ["knn"]),
    "fitted string": ("fitted", "yes"),
    "results list": ("results", [1]),
    "preprocessing string": ("preprocessing", "imagenet"),
    "card hash": ("card_sha256", 5),
    "format version": ("format_version", "two"),
    "files list": ("files", ["model.safetensors"]),
    "files unknown": ("files.evil.py", {}),
}


def _set(config: dict, path: str, value) -> None:
    *parents, last = path.split(".", 1) if path.startswith("files.") else path.split(".")
    target = config
    for part in parents:
        target = target[part]
    target[last] = value


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_config_is_refused_naming_file_and_field(saved, case):
    path, value = TAMPERED[case]
    config = json.loads((saved / CONFIG_NAME).read_text())
    _set(config, path, value)
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    before = _snapshot(saved)
    model = TinyNet()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CorruptCheckpointError) as info:
        OODUnleash.from_pretrained(saved, model=model)
    message = str(info.value)
    assert CONFIG_NAME in message and str(saved) in message
    field = path.split(".")[0] if path.startswith("files") else path
    assert f"field '{field}" in message, message  # the field, or one inside it
    assert _snapshot(saved) == before
    assert same_state(model.state_dict(), weights)  # nothing was loaded into it


@pytest.mark.parametrize(
    ("field", "value"),
    [("loss_constraint", -5), ("method", "dense"), ("training", {"history": "abc"})],
)
def test_tampered_v1_config_is_refused(tmp_path, field, value):
    """A checkpoint written by 0.1 is validated after its conversion, the same way."""
    folder = Path(shutil.copytree(FIXTURE_V1, tmp_path / "v1"))
    config = json.loads((folder / CONFIG_NAME).read_text())
    config[field] = value
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match=rf"{CONFIG_NAME}.*field"):
        OODUnleash.from_pretrained(folder, model=nn.Sequential())


@pytest.mark.parametrize(
    ("key", "value"), [("keep_ratio", 5), ("mask_mode", "row"), ("no_such_argument", 1)]
)
def test_params_the_wrapper_refuses(saved, key, value):
    config = json.loads((saved / CONFIG_NAME).read_text())
    config["params"][key] = value
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match=rf"{CONFIG_NAME}.*field 'params'.*{key}"):
        OODUnleash.from_pretrained(saved, model=TinyNet)


def test_config_that_is_not_json_or_not_an_object(saved):
    (saved / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        OODUnleash.from_pretrained(saved, model=TinyNet())
    (saved / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(CorruptCheckpointError, match="must hold a JSON object"):
        OODUnleash.from_pretrained(saved, model=TinyNet())


# --------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
@pytest.mark.parametrize("name", [WEIGHTS_NAME, SCORES_NAME, MASKS_NAME])
def test_damaged_tensor_file_is_reported(saved, damage, name):
    path = saved / name
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-3] ^= 0xFF  # inside the tensor data: only the checksum can tell
    else:
        data = bytearray(b"\x00" * 8 + b"not a safetensors header")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=name.replace(".", r"\.")):
        OODUnleash.from_pretrained(saved, model=TinyNet())
    if damage != "flip":
        # Without the checksum, safetensors' own parsing still refuses the file clearly.
        with pytest.raises(CorruptCheckpointError, match="not a readable safetensors file"):
            OODUnleash.from_pretrained(saved, model=TinyNet(), verify=False)


@pytest.mark.parametrize("name", [WEIGHTS_NAME, SCORES_NAME, MASKS_NAME])
def test_missing_file_is_reported(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointNotFoundError, match=rf"incomplete.*{name}"):
        OODUnleash.from_pretrained(saved, model=TinyNet())


# --------------------------------------------------------------------------- bad load sources
def test_bad_sources_are_named(saved, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="No checkpoint folder"):
        OODUnleash.from_pretrained(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointNotFoundError, match="is a file"):
        OODUnleash.from_pretrained(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="not an oodunleash checkpoint"):
        OODUnleash.from_pretrained(tmp_path / "empty")
    (tmp_path / "timm-only").mkdir()
    (tmp_path / "timm-only" / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match="local-dir"):
        OODUnleash.from_pretrained(tmp_path / "timm-only")
    with pytest.raises(TypeError, match="custom architecture"):
        OODUnleash.from_pretrained(saved)
    with pytest.raises(TypeError, match="not an nn.Module"):
        OODUnleash.from_pretrained(saved, model=lambda **kwargs: 3)
    with pytest.raises(TypeError, match="nn.Module or a factory"):
        OODUnleash.from_pretrained(saved, model=3)
    wrong_layers = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(CheckpointMismatchError):
        OODUnleash.from_pretrained(saved, model=wrong_layers)


# --------------------------------------------------------------------------- bad save targets
def test_save_path_that_is_a_file(old, tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"user data")
    with pytest.raises(NotADirectoryError, match="is a file"):
        old.save_pretrained(target)
    assert target.read_bytes() == b"user data"


@pytest.mark.parametrize("where", ["folder", "parent"])
def test_read_only_folder(old, saved, tmp_path, where):
    target = saved if where == "folder" else tmp_path / "locked" / "ckpt"
    locked = saved if where == "folder" else target.parent
    locked.mkdir(exist_ok=True)
    before = _snapshot(tmp_path)
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(PermissionError, match="read-only.*chmod"):
            old.save_pretrained(target)
    finally:
        locked.chmod(stat.S_IRWXU)
    assert _snapshot(tmp_path) == before


def test_users_readme_is_never_replaced(old, tmp_path):
    """save_pretrained into a folder holding the user's README.md refuses and names
    overwrite=True; the README and every other file stay as they are."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# My project\n")
    (project / "train.py").write_text("print('hi')\n")
    before = _snapshot(project)
    with pytest.raises(FileExistsError, match=r"README\.md.*overwrite=True"):
        old.save_pretrained(project)
    assert _snapshot(project) == before
    # Without a card there is no clash: the checkpoint goes in beside the user's files.
    old.save_pretrained(project, model_card=False)
    assert (project / "README.md").read_text() == "# My project\n"
    assert (project / "train.py").read_text() == "print('hi')\n"
    assert OODUnleash.from_pretrained(project, model=TinyNet).is_fitted
    # overwrite=True replaces it, and only it.
    old.save_pretrained(project, overwrite=True)
    assert "library_name: oodunleash" in (project / "README.md").read_text()
    assert (project / "train.py").read_text() == "print('hi')\n"


def test_card_edited_by_hand_is_the_users(old, new, saved):
    card = saved / "README.md"
    card.write_text(card.read_text() + "\nMy notes.\n")
    before = _snapshot(saved)
    with pytest.raises(FileExistsError, match=r"README\.md.*edited since.*overwrite=True"):
        new.save_pretrained(saved)
    assert _snapshot(saved) == before
    new.save_pretrained(saved, overwrite=True)
    assert "My notes." not in card.read_text()


@pytest.mark.parametrize("name", ["README.md", CONFIG_NAME, WEIGHTS_NAME])
def test_foreign_file_with_a_checkpoint_name(old, tmp_path, name):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / name).write_text("{}")
    with pytest.raises(FileExistsError, match=rf"{name}.*overwrite=True"):
        old.save_pretrained(folder)
    assert _snapshot(folder) == {name: b"{}"}


def test_folder_with_subfolders_is_refused(old, saved):
    (saved / "data").mkdir()
    (saved / "data" / "x.csv").write_text("1,2\n")
    before = _snapshot(saved)
    with pytest.raises(FileExistsError, match=r"folders.*\bdata\b.*folder of its own"):
        old.save_pretrained(saved, overwrite=True)
    assert _snapshot(saved) == before


def test_save_through_a_symlink_keeps_the_link(old, new, saved):
    link = saved.parent / "latest"
    link.symlink_to(saved, target_is_directory=True)
    new.save_pretrained(link, keep_masks=True)
    assert link.is_symlink() and link.resolve() == saved.resolve()
    loaded = OODUnleash.from_pretrained(link, model=TinyNet)
    assert same_state(loaded.model.state_dict(), new.model.state_dict())


def test_working_directory_is_refused(old, saved, monkeypatch):
    monkeypatch.chdir(saved)
    before = _snapshot(saved)
    with pytest.raises(ValueError, match="working directory.*save_pretrained"):
        old.save_pretrained(".")
    assert _snapshot(saved) == before


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"class_names": ["a", "b"]}, ValueError, "class_names has 2 entries"),
        ({"model_kwargs": {"act": nn.ReLU}}, ValueError, "model_kwargs must be JSON"),
        ({"input_size": (16, 16)}, ValueError, r"input_size must be \(channels"),
        ({"mean": "imagenet"}, ValueError, "mean must be a number or a sequence"),
        ({"card_data": {"tags": object()}}, Exception, None),
    ],
)
def test_bad_save_options_write_nothing(old, saved, options, error, match):
    before = _snapshot(saved)
    with pytest.raises(error, match=match):
        old.save_pretrained(saved, **options)
    assert _snapshot(saved) == before
    assert not list(saved.parent.glob(".ckpt.*"))


def test_keep_masks_without_masks(saved):
    baked = OODUnleash.from_pretrained(saved, model=TinyNet, verify=True)
    baked.masks_ = None  # as after loading a baked checkpoint
    with pytest.raises(ValueError, match="keep_masks=True needs the learnt masks"):
        baked.save_pretrained(saved.parent / "again", keep_masks=True)
    assert not (saved.parent / "again").exists()


# --------------------------------------------------------------------------- killed saves
#: Steps that change the disk in the worker's save over an existing checkpoint holding one user
#: file: staging folder, five files, the user's file linked in, the swap (one exchange, or two
#: renames), removing the old folder. Killed up to LAST_OLD_STEP, the old checkpoint is there
#: (after the first of the two renames: beside the folder, where loading finds it).
STEPS = {"exchange": 9, "fallback": 10}
LAST_OLD_STEP = {"exchange": 8, "fallback": 9}


def _run_worker(folder: Path, seed: int, kill_at: int, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(TESTS.parents[1]))  # the repository: tests is a package
    return subprocess.run(
        [sys.executable, str(TESTS / "kill_worker.py"), str(folder), str(seed),
         str(kill_at), mode],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("mode", sorted(STEPS))
def test_worker_counts_every_step(pristine, tmp_path, mode, monkeypatch):
    """The kill points below cover every step: count them in this process."""
    folder = Path(shutil.copytree(pristine, tmp_path / "ckpt"))
    (folder / "notes.txt").write_text("mine")
    steps = []
    monkeypatch.setattr(folder_module, "_fault_point", lambda: steps.append(1))
    if mode == "fallback":
        monkeypatch.setattr(folder_module, "_exchange", lambda a, b: False)
    tiny_umap(2).save_pretrained(folder, keep_masks=True)
    assert len(steps) == STEPS[mode]


#: Every step of the atomic-exchange save, and the steps where the two-rename swap differs
#: (the ones before it are the same code).
KILL_POINTS = [("exchange", k) for k in range(1, STEPS["exchange"] + 1)] + [
    ("fallback", k) for k in range(LAST_OLD_STEP["exchange"], STEPS["fallback"] + 1)
]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "kill_at"), KILL_POINTS)
def test_save_killed_at_any_step_leaves_old_or_new(old, new, pristine, tmp_path, mode, kill_at):
    folder = Path(shutil.copytree(pristine, tmp_path / "ckpt"))
    (folder / "notes.txt").write_text("mine")
    run = _run_worker(folder, seed=2, kill_at=kill_at, mode=mode)
    assert run.returncode == -9, run.stderr[-2000:]  # killed, as planned

    with pytest.warns(UserWarning, match="interrupted") if not folder.exists() else _no_warning():
        loaded = OODUnleash.from_pretrained(folder, model=TinyNet)
    expected = old if kill_at <= LAST_OLD_STEP[mode] else new
    assert same_state(loaded.model.state_dict(), expected.model.state_dict())
    assert loaded.masks_ is not None and sorted(loaded.fitted_scores_) == ["knn"]
    # The user's file survives wherever the folder is; the next save recovers and cleans up.
    new.save_pretrained(folder, keep_masks=True)
    assert (folder / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded = OODUnleash.from_pretrained(folder, model=TinyNet)
    assert same_state(loaded.model.state_dict(), new.model.state_dict())


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def test_staging_folders_of_dead_saves_are_removed_live_ones_kept(old, saved):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = saved.parent / f".ckpt.oodunleash-tmp-{dead}"
    live = saved.parent / ".ckpt.oodunleash-tmp-1"  # pid 1 runs as long as the system does
    for folder in (stale, live):
        folder.mkdir()
        (folder / WEIGHTS_NAME).write_bytes(b"half written")
    old.save_pretrained(saved, keep_masks=True)
    assert not stale.exists() and live.is_dir()

"""Two saves into one folder at once take turns: the second reads which files the checkpoint it
replaces owns after the first has swapped its own in (oodunleash.checkpoint.folder)."""

from __future__ import annotations

import json
import threading

import oodunleash.checkpoint.folder as folder_module
from oodunleash import OODUnleash
from oodunleash.checkpoint import CONFIG_NAME
from tests.checkpoint.builders import TinyNet, loader, tiny_umap


def _um() -> OODUnleash:
    return OODUnleash(TinyNet(), constraint=0.5).fit(loader(), epochs=1, progress=False)


def test_umap_and_um_saving_into_one_folder(tmp_path, monkeypatch):
    umap, um = tiny_umap(1), _um()
    folder = tmp_path / "ckpt"
    um.save_pretrained(folder)
    real, state = folder_module._fault_point, {"writer": None}

    def umap_save():
        umap.save_pretrained(folder, keep_masks=True)

    def fault_point():  # the UM save, once under way, lets the UMAP save start
        if state["writer"] is None and threading.current_thread() is threading.main_thread():
            state["writer"] = threading.Thread(target=umap_save)
            state["writer"].start()
            state["writer"].join(timeout=1.0)
        real()

    monkeypatch.setattr(folder_module, "_fault_point", fault_point)
    um.save_pretrained(folder)
    state["writer"].join()
    monkeypatch.setattr(folder_module, "_fault_point", real)
    # The UMAP save came last: its checkpoint, and no file of anyone else's.
    config = json.loads((folder / CONFIG_NAME).read_text())
    listed = set(config["files"]) | {"README.md"}
    assert {p.name for p in folder.iterdir()} == listed
    assert OODUnleash.from_pretrained(folder, model=TinyNet).masks_ is not None
    um.save_pretrained(folder)  # and each can save over the other again
    umap.save_pretrained(folder, keep_masks=True)
    assert OODUnleash.from_pretrained(folder, model=TinyNet).masks_ is not None

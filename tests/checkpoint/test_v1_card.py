"""A format-1 checkpoint's model card recorded no checksum: saving over it never replaces a
card the user may have edited without a word (oodunleash.checkpoint.format.owned_files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from oodunleash import OODUnleash
from tests.checkpoint.fixtures.checkpoint_v0_1.make_fixture import make_sequential

FIXTURE_V1 = Path(__file__).resolve().parent / "fixtures" / "checkpoint_v0_1" / "sequential_umap"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("edited", [True, False])
def test_v1_card_is_not_replaced_silently(tmp_path, edited):
    folder = Path(shutil.copytree(FIXTURE_V1, tmp_path / "v1"))
    card = folder / "README.md"
    if edited:  # the front matter still says library_name: oodunleash
        card.write_text(card.read_text() + "\n## My notes\n\nTrained on our data.\n")
    loaded = OODUnleash.from_pretrained(folder, model=make_sequential)
    before = _snapshot(folder)
    with pytest.raises(FileExistsError, match=r"README\.md.*format-1.*model_card=False.*overwrite"):
        loaded.save_pretrained(folder, keep_masks=True)
    assert _snapshot(folder) == before
    loaded.save_pretrained(folder, keep_masks=True, model_card=False)  # the card is kept
    assert card.read_bytes() == before["README.md"]
    assert OODUnleash.from_pretrained(folder, model=make_sequential).is_fitted

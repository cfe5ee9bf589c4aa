import pathlib

import pytest

from oodunleash.runtime.files import write_atomic


def test_write_atomic_replaces_text_and_bytes(tmp_path):
    target = tmp_path / "seed.json"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["seed.json"]


def test_interrupted_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "seed.json"
    write_atomic(target, "hours of results")

    real_write_text = pathlib.Path.write_text

    def fail_midway(self, data, *args, **kwargs):
        real_write_text(self, data[:3], *args, **kwargs)  # part of the file is on disk...
        raise KeyboardInterrupt  # ...when Ctrl-C (or a full disk) stops the write

    monkeypatch.setattr(pathlib.Path, "write_text", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "new results")
    assert target.read_text() == "hours of results"
    assert [p.name for p in tmp_path.iterdir()] == ["seed.json"]


def test_save_figure_writes_the_suffix_format_and_keeps_the_old_image_on_failure(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from oodunleash.evaluation.results import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "curve.png", dpi=50)
    save_figure(fig, tmp_path / "curve.svg")
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in (tmp_path / "curve.svg").read_bytes()
    old = (tmp_path / "curve.png").read_bytes()

    class Interrupted:
        def savefig(self, buffer, **kwargs):
            buffer.write(b"\x89PNG half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_figure(Interrupted(), tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "curve.svg"]
    plt.close(fig)

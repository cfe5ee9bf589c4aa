"""The pass over a data set reads nothing back to the host per batch: its checks (NaN/inf
images, logits and features; labels outside the classes) run on the device and are read once,
and still name the first failing batch, as when every batch was read back on its own. Plus a
run of the speed benchmark's evaluation table on one tiny row."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from oodunleash import OODUnleash
from oodunleash.bench.models import SmallCNN
from oodunleash.features import collect as features_module
from oodunleash.features.collect import FeatureExtractor, collect_features
from oodunleash.scores import KNN

#: Tensor methods that read values back to the host (a device sync on a GPU).
HOST_READS = {
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
}


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(num_classes=5, in_chans=3, width=4).eval()


def batches(n: int, *, shift: float = 0.0, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=gen) + shift, torch.arange(8) % 5) for _ in range(n)]


class HostReads(TorchFunctionMode):
    """Counts host reads, and ``.to`` calls that move a tensor to ``store`` (on a CPU-only
    machine a move to the CPU cannot be told from a no-op ``.to``, so a store on the meta device
    stands for the host)."""

    def __init__(self, store: str | None = None) -> None:
        super().__init__()
        self.store = store
        self.calls: list[str] = []

    def _moves(self, args: tuple, kwargs: dict) -> bool:
        targets = [kwargs.get("device"), *args[1:]]
        return any(
            isinstance(t, str | torch.device) and torch.device(t).type == self.store
            for t in targets
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_READS or (name == "to" and self.store and self._moves(args, kwargs)):
            self.calls.append(name)
        return func(*args, **kwargs)


def host_reads_of_fit_and_evaluate(n: int) -> list[str]:
    unleashed = OODUnleash(cnn())
    unleashed.score(batches(1)[0][0], "energy")  # resolve how the model is read, uncounted
    train, test, far = batches(n, seed=1), batches(n, seed=2), batches(n, shift=3.0, seed=3)
    with HostReads() as reads:
        unleashed.fit_scores(train, {"knn": KNN(k=3)}, progress=False)
        unleashed.evaluate(test, {"far": far}, ["energy", "msp", "knn", "ash_s"], progress=False)
    return reads.calls


def test_fit_and_evaluate_read_nothing_back_per_batch():
    """Two and six batches per data set: the same host reads, so none of them is per batch
    (a `.cpu()`, `.item()` or `bool(...)` per batch adds four per data set)."""
    few, many = host_reads_of_fit_and_evaluate(2), host_reads_of_fit_and_evaluate(6)
    assert sorted(many) == sorted(few)
    assert "tolist" in few  # the checks' one read-back per data set is seen by the counter


def test_first_failing_batch_is_named_after_the_pass():
    """Problems in batches 1 (labels) and 3 (NaN pixels): batch 1 is named. A forward pass
    that fails on batch 3 after NaN pixels in batch 1 reports batch 1's pixels."""
    unleashed = OODUnleash(cnn())
    data = batches(4)
    data[1] = (data[1][0], torch.arange(8))
    data[3] = (data[3][0].clone().index_fill_(0, torch.tensor([0]), float("nan")), data[3][1])
    with pytest.raises(ValueError, match=r"On batch 1 of the 'ID' data: Labels must lie.*0 to 7"):
        unleashed.evaluate(data, {"far": batches(1)}, ["energy"], progress=False)

    data = batches(4)
    data[1] = (data[1][0].clone().index_fill_(0, torch.tensor([2]), float("inf")), data[1][1])
    data[3] = (torch.randn(8, 1, 8, 8), data[3][1])  # one channel: the forward pass fails
    with pytest.raises(
        ValueError, match=r"On batch 1 of the 'ID' data: The images.*contain 192 NaN"
    ):
        unleashed.evaluate(data, {"far": batches(1)}, ["energy"], progress=False)
    with pytest.raises(ValueError, match=r"On batch 3 of the 'ID' data: .*1 channels"):
        unleashed.evaluate(batches(3) + data[3:], {"far": batches(1)}, ["energy"], progress=False)


def test_nonfinite_logits_of_finite_images_name_the_batch_and_the_weights():
    """Pixels near the float32 limit are finite but overflow the convolution (batch 2)."""
    data = batches(3)
    data[2] = (data[2][0].clamp(-1, 1) * 3e38, data[2][1])
    with pytest.raises(
        ValueError, match=r"logits on batch 2 of the 'ID' data contain \d+ NaN/inf.*weights"
    ):
        OODUnleash(cnn()).evaluate(data, {"far": batches(1)}, ["energy"], progress=False)


def test_kept_tensors_move_to_the_store_in_chunks(monkeypatch):
    """Where the store is another device, kept tensors wait on the model's device and move
    there once per field (two and six batches: the same moves), or in chunks of at most
    ``_MOVE_BYTES`` (here one byte: every batch)."""
    ex = FeatureExtractor(cnn())
    whole = collect_features(ex, batches(5), keep={"logits", "labels"})
    moves = []
    for n in (2, 6):
        with HostReads(store="meta") as reads:
            data = collect_features(ex, batches(n), keep={"logits", "labels"}, store_device="meta")
        moves.append(reads.calls.count("to"))
        assert data.logits.device.type == "meta" and data.logits.shape == (8 * n, 5)
    assert moves == [2, 2]
    monkeypatch.setattr(features_module, "_MOVE_BYTES", 1)
    with HostReads(store="meta") as reads:
        moved = collect_features(ex, batches(5), keep={"logits", "labels"}, store_device="meta")
    assert reads.calls.count("to") == 2 * 5
    assert moved.logits.shape == whole.logits.shape and moved.labels.shape == (40,)


def _speed_benchmark():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "benchmark_speed.py"
    spec = importlib.util.spec_from_file_location("benchmark_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_speed_benchmark_train_table_times_every_side(capsys):
    """``examples/benchmark_speed.py`` on one tiny row: a plain step time and one ratio per
    library side (UM, both UMAP mask modes), each positive, from the timed last epoch."""
    bench = _speed_benchmark()
    bench.train_table([("resnet18", 32, 4)], bench.SIDES, torch.device("cpu"), 2, 1)
    out = capsys.readouterr().out
    assert "epoch 2 of 2 timed" in out
    cells = [c.strip() for c in out.strip().splitlines()[-1].strip("|").split("|")]
    assert cells[:3] == ["resnet18", "32", "4"] and cells[-1] == "<= 1.5"
    times = [float(c) for c in cells[3:-1]]
    assert len(times) == 1 + len(bench.SIDES) and min(times) > 0


def test_speed_benchmark_eval_table_times_every_side(capsys):
    """``examples/benchmark_speed.py --eval`` on one tiny row: a plain rate and one ratio per
    library side, each positive."""
    bench = _speed_benchmark()
    bench.eval_table([("small_cnn", 28, 16)], torch.device("cpu"), steps=4, repeats=1)
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["small_cnn", "28", "16", "4"] and cells[-1] == ">= 0.95"
    rates = [float(c.split()[0]) for c in cells[4:-1]]
    assert len(rates) == 1 + len(bench.EVAL_SIDES) and min(rates) > 0

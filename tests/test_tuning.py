"""oodunleash.tune: the selection rule, the candidates, the result object."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import oodunleash
from oodunleash import OODUnleash, proxy_ood, tune
from oodunleash.scores import Energy, ScoreSpec
from oodunleash.tuning import CandidateResult, parse_finetune, score_variants, select
from oodunleash.tuning import search as search_module
from oodunleash.tuning.result import ranked, ranked_candidates, recipe_name
from tests.helpers.scripts import load_script
from tests.helpers.toys import same_state, sequential_cnn, state_copy

CLASSES = 3
FAST = {"scores": ["energy", "msp", "knn"], "epochs": 1, "progress": False, "proxy_size": 60}


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c lights up band c of an 8x8 image: easy to learn, so the training loss is low."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=gen)
    for c in range(CLASSES):
        x[labels == c, :, 2 * c + 1 : 2 * c + 3, :] += 2.0
    return x, labels


def _net() -> nn.Module:
    return sequential_cnn(1, 8, CLASSES, hidden=16, pool=2, batchnorm=True)


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    x, y = _images(300, 0)
    vx, vy = _images(120, 1)
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    train = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True)
    val = DataLoader(TensorDataset(vx, vy), batch_size=40)
    return model, train, val


def _row(name: str, tier: int, accuracy: float, fpr: float, auroc: float = 90.0):
    kind = {0: "unchanged", 1: "checkpoint", 2: "finetune"}[tier]
    return CandidateResult(
        name, kind, tier, accuracy, {"s": {"mean": {"fpr95": fpr, "auroc": auroc}}}
    )


# ----------------------------------------------------------------------------- the rule
def test_a_candidate_that_breaks_accuracy_is_never_chosen():
    rows = [_row("unchanged", 0, 90.0, 50.0), _row("um", 2, 88.9, 1.0), _row("umap", 2, 89.1, 30.0)]
    chosen, floor = select(rows, max_accuracy_drop=1.0)
    assert (chosen.name, floor) == ("umap", 89.0)
    chosen, _ = select(rows, max_accuracy_drop=1.2)  # a looser budget lets "um" in
    assert chosen.name == "um"


def test_the_unchanged_model_wins_when_every_fine_tune_is_worse():
    rows = [_row("unchanged", 0, 90.0, 20.0), _row("um", 2, 91.0, 25.0), _row("umap", 2, 90, 20.1)]
    assert select(rows, 1.0)[0].name == "unchanged"


def test_ties_go_to_the_cheaper_candidate_then_the_first_listed():
    rows = [_row("um", 2, 90.0, 20.0), _row("ckpt", 1, 90.0, 20.0), _row("unchanged", 0, 90, 20)]
    assert select(rows, 1.0)[0].name == "unchanged"
    assert select(rows[:2] + [_row("unchanged", 0, 90.0, 40.0)], 1.0)[0].name == "ckpt"
    pair = [_row("unchanged", 0, 90, 40), _row("umap", 2, 90, 20), _row("um", 2, 90, 20)]
    assert select(pair, 1.0)[0].name == "umap"


def test_within_a_candidate_equal_ranks_go_to_the_lowest_fpr_then_highest_auroc():
    row = CandidateResult(
        "unchanged",
        "unchanged",
        0,
        90.0,
        {
            "energy": {"mean": {"fpr95": 30.0, "auroc": 88.0}},
            "knn k=10": {"mean": {"fpr95": 10.0, "auroc": 85.0}},
            "dice s=0.7": {"mean": {"fpr95": 20.0, "auroc": 88.0}},
        },
    )
    assert row.best_score == "dice s=0.7"  # ranks first with energy, lower FPR95
    assert (row.mean_fpr95, row.mean_auroc) == (20.0, 88.0)


def _sets(*per_set: tuple[float, float]) -> dict[str, dict[str, float]]:
    """``{set: {auroc, fpr95}}`` for sets x, y, z and their mean, from (AUROC, FPR95) pairs."""
    rows = {o: {"auroc": a, "fpr95": f} for o, (a, f) in zip("xyz", per_set, strict=True)}
    rows["mean"] = {k: sum(r[k] for r in rows.values()) / len(rows) for k in ("auroc", "fpr95")}
    return rows


# "sharp" separates the two easy sets x and z best but is worse on the hard set y, where
# every score is poor; its mean FPR95 (28.8) is dominated by y, "blunt"'s (26.7) is not.
SHARP = _sets((99.9, 0.5), (70.0, 85.0), (99.8, 1.0))
BLUNT = _sets((97.0, 10.0), (75.0, 60.0), (96.0, 10.0))


def test_one_hard_set_does_not_decide_the_score_alone():
    row = CandidateResult("unchanged", "unchanged", 0, 90.0, {"blunt": BLUNT, "sharp": SHARP})
    assert BLUNT["mean"]["fpr95"] < SHARP["mean"]["fpr95"]
    assert ranked({"blunt": BLUNT, "sharp": SHARP}) == ["sharp", "blunt"]  # best on 2 of 3
    assert row.best_score == "sharp"


def test_candidates_compare_by_the_same_rule():
    unchanged = CandidateResult("unchanged", "unchanged", 0, 90.0, {"knn": SHARP})
    um = CandidateResult("um", "finetune", 2, 90.0, {"knn": BLUNT})
    assert um.mean_fpr95 < unchanged.mean_fpr95
    assert select([unchanged, um], 1.0)[0].name == "unchanged"
    assert select([um, unchanged], 1.0)[0].name == "unchanged"  # the order given does not decide
    assert ranked_candidates([um, unchanged]) == [unchanged, um]


def test_equal_aurocs_share_their_rank():
    tied = {
        "a": _sets((100.0, 0.0), (80.0, 40.0), (100.0, 0.0)),
        "b": _sets((100.0, 0.0), (80.0, 30.0), (100.0, 0.0)),
        "c": _sets((99.0, 2.0), (81.0, 50.0), (99.0, 2.0)),
    }
    # ranks x: a, b 0.5, c 2; y: c 0, a, b 1.5; z as x: a and b tie at 2.5 / 3, FPR95 decides
    assert ranked(tied) == ["b", "a", "c"]


def test_select_needs_the_unchanged_model():
    with pytest.raises(ValueError, match="unchanged model must be among"):
        select([_row("um", 2, 90.0, 20.0)], 1.0)


def test_candidate_names_and_score_variants():
    assert parse_finetune("um").factor == oodunleash.finetune.constraint.DEFAULT_CONSTRAINT_FACTOR
    assert (parse_finetune("umap 2.5x").method, parse_finetune("umap 2.5x").factor) == ("umap", 2.5)
    with pytest.raises(ValueError, match="Unknown fine-tune 'sgd'"):
        parse_finetune("sgd")
    variants = score_variants(["ebo", "knn", "react"], train_size=20)  # an alias, a grid
    # Labels are ScoreSpec labels: the registered default keeps the bare name (ReAct's 90).
    assert list(variants) == ["energy", "knn k=1", "knn k=10", "react p=85", "react", "react p=95"]
    assert variants["knn k=10"].build().k == 10 and variants["react p=85"].build().percentile == 85
    assert list(score_variants(["knn k=1"])) == ["knn k=1"]  # a label is that variant alone
    with pytest.raises(ValueError, match="Unknown OOD score"):
        score_variants(["nope"])


# ----------------------------------------------------------------------------- end to end
def test_tune_never_touches_the_model_and_is_never_worse_on_validation(data, capsys):
    model, train, val = data
    before, training = state_copy(model), model.training
    options = {"finetunes": ["um", "um control", "umap"], "promote": None}  # all full, no screen
    result = tune(model, train, val, seed=0, **options, **FAST)
    assert same_state(before, state_copy(model)) and model.training == training
    ran = result.candidates
    assert set(ran) == {"unchanged", "um", "um control", "umap"}, result.dropped
    reference = ran["unchanged"]
    chosen = ran[result.best_candidate]
    assert chosen.mean_fpr95 <= reference.mean_fpr95
    assert chosen.accuracy >= reference.accuracy - 1.0 - 1e-9
    assert result.best_name == recipe_name(result.best_candidate, result.best_score)
    singles = {"energy", "msp", "knn k=1", "knn k=10", "knn"}  # k=50 is KNN's default
    for row in ran.values():  # every candidate read out by every variant, on every set
        assert singles <= set(row.metrics)
        # and by the fusions of its best three families: three pairs and the triple
        fused = [ScoreSpec.parse(label) for label in set(row.metrics) - singles]
        assert len(fused) == 4 and {s.name for s in fused} == {"fused"}
        assert set(row.metrics["energy"]) == set(result.ood_sets) | {"mean"}
    assert ran["um"].loss_constraint == pytest.approx(
        2 * oodunleash.mean_cross_entropy(model, train)
    )
    assert ran["um control"].loss_constraint is None
    assert result.best_name in capsys.readouterr().out  # the table is printed


def test_best_scores_with_the_chosen_score_and_reproduces_its_validation_numbers(data):
    model, train, val = data
    result = tune(model, train, val, finetunes=["um control"], verbose=False, **FAST)
    best = result.best
    chosen = best.default_score  # a ScoreSpec: what save_pretrained records
    assert chosen == ScoreSpec.parse(result.best_score)  # a fused label parses too
    assert list(best.fitted_scores_) == [result.best_score]  # only the chosen score is kept
    x = next(iter(val))[0]
    assert torch.equal(best.score(x), best.score(x, chosen))
    assert torch.equal(best.score(x), best.score(x, result.best_score))
    again = best.evaluate(val, proxy_ood(val, n=60, seed=0), progress=False)
    assert again.score_names == [result.best_score]  # once, as the default
    mean = again.averages()[result.best_score]["fpr95"]
    assert 100 * mean == pytest.approx(result.candidates[result.best_candidate].mean_fpr95)
    if result.best_candidate == "unchanged":
        assert best.model is model


def test_a_checkpoint_equal_to_the_model_is_read_out_once_and_the_unchanged_model_wins(data):
    model, train, val = data
    result = tune(model, train, val, finetunes=[], checkpoints={"same": model.state_dict()}, **FAST)
    assert list(result.candidates) == ["unchanged"]
    assert result.dropped == {
        "checkpoint same": "identical weights to 'unchanged', which was read out"
    }
    assert result.best_candidate == "unchanged"


def test_time_budget_drops_the_most_expensive_candidates_and_says_which(data, monkeypatch):
    model, train, val = data
    cost = {"checkpoint early": 1.0, "um control": 1e6, "umap control": 1e7}

    def fake_estimate(spec, epochs, pass_s, read_s):
        return cost[spec.name]

    monkeypatch.setattr(search_module, "estimated_seconds", fake_estimate)
    early = {k: v + 0.01 for k, v in model.state_dict().items() if v.is_floating_point()}
    early |= {k: v for k, v in model.state_dict().items() if not v.is_floating_point()}
    result = tune(
        model,
        train,
        val,
        finetunes=["umap control", "um control"],
        checkpoints={"early": early},
        time_budget=3600,
        promote=None,  # no screening: the budget alone decides
        **FAST,
    )
    assert set(result.candidates) == {"unchanged", "checkpoint early"}
    assert list(result.dropped) == ["um control", "umap control"]  # cheapest first
    assert all("time budget" in reason for reason in result.dropped.values())
    assert "Not run: umap control (time budget" in result.to_markdown()


def test_a_tiny_time_budget_still_reads_the_unchanged_model(data):
    model, train, val = data
    result = tune(model, train, val, finetunes=["um"], time_budget=1e-6, **FAST)
    assert list(result.candidates) == ["unchanged"] and list(result.dropped) == ["um"]
    assert result.best_candidate == "unchanged"


def test_given_ood_loaders_replace_or_extend_the_proxies(data):
    model, train, val = data
    noise = {"noise": DataLoader(TensorDataset(4 * torch.randn(50, 1, 8, 8)), batch_size=25)}
    replaced = tune(model, train, val, noise, finetunes=[], **FAST)
    assert replaced.ood_sets == ["noise"] and replaced.proxy is False
    extended = tune(
        model, train, val, noise, ood_mode="extend", proxy_families=["jigsaw"], finetunes=[], **FAST
    )
    assert extended.ood_sets == ["jigsaw", "noise"] and extended.proxy is True
    with pytest.raises(ValueError, match="reuse proxy family names \\['jigsaw'\\]"):
        tune(model, train, val, {"jigsaw": noise["noise"]}, ood_mode="extend", **FAST)
    with pytest.raises(ValueError, match="ood_mode must be"):
        tune(model, train, val, noise, ood_mode="merge", **FAST)


def test_a_score_that_cannot_read_the_model_is_left_out_and_said(data):
    model, train, val = data

    class Broken(Energy):
        name = "broken"

        def score(self, data):
            raise RuntimeError("cannot read this model")

    scores = {"energy": "energy", "broken": Broken()}
    result = tune(model, train, val, finetunes=["um control"], **(FAST | {"scores": scores}))
    assert list(result.skipped_scores) == ["broken"]
    assert "cannot read this model" in result.skipped_scores["broken"]
    assert all(list(c.metrics) == ["energy"] for c in result.candidates.values())


def test_to_dict_to_markdown_and_plot(data, tmp_path):
    model, train, val = data
    result = tune(model, train, val, finetunes=["um control"], keep_all=True, **FAST)
    as_dict = json.loads(json.dumps(result.to_dict()))
    assert as_dict["best_name"] == result.best_name
    assert set(as_dict["candidates"]) == {"unchanged", "um control"}
    block = as_dict["candidates"]["unchanged"]
    assert block["eligible"] is True and block["kind"] == "unchanged"
    assert set(block["scores"]["msp"]["mean"]) == {"auroc", "fpr95"}
    table = result.to_markdown()
    assert f"**{result.best_candidate}**" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 2  # head, 2 rows
    # five single variants and four fusions of the best three families
    # the rank column is what the rule compared: the chosen row has the lowest
    cells = [[c.strip("* ") for c in line.split("|")[1:-1]] for line in table.splitlines()[2:]]
    head = [c.strip() for c in table.splitlines()[0].split("|")[1:-1]]
    ranks = {row[0]: float(row[head.index("rank")]) for row in cells if len(row) == len(head)}
    assert set(ranks) == {"unchanged", "um control"}
    assert ranks[result.best_candidate] == min(ranks.values())
    rows = result.to_markdown(all_scores=True).splitlines()
    assert sum(r.startswith(("| um control |", "| **um control**")) for r in rows) == 5 + 4
    assert set(result.unleashed) == {"unchanged", "um control"}
    path = tmp_path / "tune.png"
    result.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000


def test_bad_arguments_fail_before_any_work(data):
    model, train, val = data
    with pytest.raises(ValueError, match="max_accuracy_drop must be >= 0"):
        tune(model, train, val, max_accuracy_drop=-1, **FAST)
    with pytest.raises(ValueError, match="time_budget must be a positive"):
        tune(model, train, val, time_budget=0, **FAST)
    with pytest.raises(TypeError, match="must be a state_dict"):
        tune(model, train, val, checkpoints={"a": "path.safetensors"}, **FAST)
    with pytest.raises(ValueError, match="names must be unique"):
        tune(model, train, val, finetunes=["um", "um"], **FAST)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        tune("model", train, val, **FAST)
    assert isinstance(OODUnleash(model), OODUnleash)


# ----------------------------------------------------------------------------- the measurement
def _fake_run(seed: int, fprs: dict[tuple[str, str], float], accuracy: dict[str, float], chosen):
    test: dict = {}
    for (candidate, score), fpr in fprs.items():
        block = test.setdefault(candidate, {"accuracy": accuracy[candidate], "scores": {}})
        per_set = {"near": {"auroc": 80.0, "fpr95": fpr}, "letters": {"auroc": 80.0, "fpr95": fpr}}
        block["scores"][score] = per_set | {"mean": {"auroc": 80.0, "fpr95": fpr}}
    # validation: the test numbers again, the candidates in the order tune lists them
    candidates = {
        name: {
            "kind": "unchanged" if name == "unchanged" else "finetune",
            "accuracy": block["accuracy"],
            "scores": {score: {"mean": m["mean"]} for score, m in block["scores"].items()},
        }
        for name, block in test.items()
    }
    val = {"candidates": candidates, "max_accuracy_drop": 1.0}
    return {"seed": seed, "test": test, "val": val, "chosen": list(chosen)}


def test_the_measurement_summary_compares_tune_with_the_fixed_recipes_and_the_oracle():
    bench = load_script("examples/benchmark_tune.py")
    accuracy = {"unchanged": 90.0, "um": 89.5, "umap": 88.0}
    fprs = {
        ("unchanged", "energy"): 60.0,
        ("unchanged", "knn k=10"): 30.0,
        ("um", "energy"): 40.0,
        ("um", "knn k=10"): 20.0,
        ("umap", "energy"): 5.0,  # best on test, but 2 points of accuracy: not the oracle
        ("umap", "knn k=10"): 50.0,
    }
    runs = [
        _fake_run(0, fprs, accuracy, ("um", "knn k=10")),
        _fake_run(1, {k: v + 10 for k, v in fprs.items()}, accuracy, ("unchanged", "knn k=10")),
    ]
    text = bench.summarize(runs)
    assert "| final model + energy | 65.0 | +0% | 90.00 | +0.00 |" in text
    assert "| default UM + energy | 45.0 | -31% | 89.50 | -0.50 |" in text
    assert "| tune's choice | 30.0 | -54% | 89.75 | -0.25 |" in text  # seeds: 20 and 30 + 10
    assert "| oracle (best on test) | 25.0 | -62% | 89.50 | -0.50 |" in text
    assert "| 0 | oracle (best on test) | um + knn k=10 | 20.0 | 89.50 |" in text
    assert "seed 0: near 60.0 → 20.0, letters 60.0 → 20.0" in text


def test_the_measurement_separates_fusion_the_fine_tune_and_the_ood_reader():
    bench = load_script("examples/benchmark_tune.py")
    accuracy = {"unchanged": 90.0, "um": 89.5, "umap": 88.0}
    fused = "knn k=10 + energy"
    fprs = {
        ("unchanged", "energy"): 60.0,
        ("unchanged", "knn k=10"): 30.0,
        ("unchanged", fused): 25.0,
        ("um", "energy"): 40.0,
        ("um", "knn k=10"): 20.0,
        ("um", fused): 22.0,
        ("umap", "energy"): 5.0,  # the best reader, but 2 points of accuracy
        ("umap", "knn k=10"): 50.0,
        ("umap", fused): 50.0,
    }
    text = bench.summarize([_fake_run(0, fprs, accuracy, ("um", "knn k=10"))])
    rows = {
        "best single post-hoc score on the final model (test)": "unchanged + knn k=10 | 30.0",
        "tune, unchanged model, single scores": "unchanged + knn k=10 | 30.0",
        "tune, unchanged model, with fusion": f"unchanged + ({fused}) | 25.0",
        "tune, single scores only": "um + knn k=10 | 20.0",
        # the OOD score of the copy that lost accuracy, the classifier's accuracy kept
        "OOD read from a fine-tuned copy, classifier unchanged": (
            "umap + energy (classifier: unchanged) | 5.0 | 90.00"
        ),
    }
    for row, cells in rows.items():
        assert f"| 0 | {row} | {cells}" in text
    table = bench.finetune_table([_fake_run(0, fprs, accuracy, ("um", "knn k=10"))])
    assert "seed 0: knn k=10" in table  # the unchanged model's best single score
    # val, test, near-OOD under it; test and near-OOD under Energy; accuracy changes; seeds
    assert "| um | 20.0 | 20.0 | 20.0 | 40.0 | 40.0 | -0.50 | -0.50 | 1 |" in table
    scores = bench.score_table([_fake_run(0, fprs, accuracy, ("um", "knn k=10"))])
    # registered defaults and fused variants of the unchanged model, best on test first
    assert scores.index(f"| {fused} | 25.0 | 25.0 | 25.0 |") < scores.index("| energy | 60.0 |")
    assert "| knn k=10 |" not in scores


def _fake_validated_run(val: dict[tuple[str, str], tuple[float, float]], test_fpr_offset: float):
    """A run whose validation block has ``{(candidate, score): (val FPR95, val accuracy)}`` and
    whose test block has the same numbers plus ``test_fpr_offset``."""
    run = _fake_run(
        0,
        {recipe: fpr + test_fpr_offset for recipe, (fpr, _) in val.items()},
        {candidate: accuracy for (candidate, _), (_, accuracy) in val.items()},
        ("unchanged", "energy"),
    )
    candidates: dict = {}
    for (candidate, score), (fpr, accuracy) in val.items():
        block = candidates.setdefault(candidate, {"accuracy": accuracy, "scores": {}})
        block["scores"][score] = {"mean": {"auroc": 80.0, "fpr95": fpr}}
    run["val"] = {"candidates": candidates, "max_accuracy_drop": 1.0}
    return run


def test_fixed_recipes_are_ranked_on_validation_pooled_over_models():
    bench = load_script("examples/benchmark_tune.py")
    small = {
        ("unchanged", "energy"): (60.0, 90.0),
        ("unchanged", "knn k=1"): (20.0, 90.0),
        ("um control", "knn k=1"): (20.0, 89.5),  # ties with unchanged: the cheaper one first
        ("um", "knn k=1"): (5.0, 87.0),  # best FPR95, but 3 points of accuracy: not eligible
        ("um", "energy"): (50.0, 87.0),
    }
    big = {recipe: (fpr + 10, acc) for recipe, (fpr, acc) in small.items()}
    big[("um control", "knn k=1")] = (40.0, 89.5)
    groups = {
        "runs/cnn": [_fake_validated_run(small, 100.0)],
        "runs/resnet": [_fake_validated_run(big, 0.0)],
    }
    text = bench.fixed_recipes(groups)
    assert "| 1 | unchanged + knn k=1 | 25.0 | 20.0 / +0.00 | 120.0 / +0.00 | 30.0 / +0.00" in text
    assert "| 2 | um control + knn k=1 | 30.0 |" in text
    assert "| not eligible | um + energy | 55.0 |" in text
    assert "um + knn k=1" not in text.split("| not eligible |")[0]  # never ranked


# ----------------------------------------------------------------------------- cost
class _Counting:
    """A loader that counts the batches read from it."""

    def __init__(self, loader):
        self.loader, self.batches = loader, 0
        self.dataset = loader.dataset

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.batches += 1
            yield batch


def test_screening_gives_the_full_schedule_to_one_fine_tune_and_reads_less(data, capsys):
    model, train, val = data
    names = ["um control", "umap control", "um"]
    read = {}
    for promote in (1, None):
        counting = _Counting(train)
        options = {**FAST, "finetunes": names, "promote": promote, "epochs": 4}
        result = tune(model, counting, val, **options)
        read[promote] = counting.batches
        if promote == 1:
            screened = result
    plan = capsys.readouterr().out
    assert "3 fine-tunes (um control, umap control, um) screened on 0.25 epoch" in plan
    assert "to read out; about" in plan and "s more to go" in plan  # the estimate, early
    ran = [n for n in screened.candidates if n != "unchanged"]
    assert len(ran) <= 1  # at most `promote` fine-tunes fully trained and read out
    for name in set(names) - set(ran):
        reason = screened.dropped[name]
        assert reason.startswith(("screened out", "identical weights", "LossConstraint")), reason
    assert read[1] < read[None] * 0.6, read  # 4 epochs once, not three times


def test_identical_candidates_are_read_out_once(data):
    model, train, val = data
    early = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    result = tune(model, train, val, finetunes=[], checkpoints={"a": early, "b": early}, **FAST)
    assert list(result.candidates) == ["unchanged", "checkpoint a"]
    assert result.dropped["checkpoint b"].startswith("identical weights to 'checkpoint a'")


def test_repr_is_a_few_lines_and_the_table_stays_in_to_markdown(data):
    model, train, val = data
    result = tune(model, train, val, finetunes=["um control"], verbose=False, **FAST)
    text = repr(result)
    assert len(text.splitlines()) <= 4 and len(text) < 400, text
    assert result.best_name in text and "to_markdown" in text
    assert "| candidate |" in result.to_markdown()


def test_bad_promote_fails_before_any_work(data):
    model, train, val = data
    with pytest.raises(ValueError, match="promote must be at least 1"):
        tune(model, train, val, promote=0, **FAST)


def test_a_tiny_time_budget_screens_nothing_and_says_so(data):
    model, train, val = data
    names = ["um control", "umap control"]
    result = tune(model, train, val, finetunes=names, time_budget=1e-6, **FAST)
    assert list(result.candidates) == ["unchanged"]
    assert sorted(result.dropped) == sorted(names)
    assert all(reason.startswith("time budget") for reason in result.dropped.values())


def test_plot_labels_of_points_at_one_spot_do_not_overlap(data):
    model, train, val = data
    result = tune(model, train, val, finetunes=[], verbose=False, **FAST)
    twin = copy.deepcopy(result.candidates["unchanged"])
    twin.name, twin.kind, twin.tier = "checkpoint twin", "checkpoint", 1
    result.candidates["checkpoint twin"] = twin
    figure = result.plot()
    offsets = [text.xyann for text in figure.axes[0].texts]
    assert len(offsets) == 2 and offsets[0] != offsets[1]


def test_tune_hands_back_a_calibrated_choice_on_held_out_images(data):
    model, train, val = data
    held_out = DataLoader(TensorDataset(_images(60, 2)[0]), batch_size=30)
    result = tune(model, train, val, finetunes=[], calibration_loader=held_out, **FAST)
    assert result.best.calibration_scores_.shape == (60,)
    decision = result.best.predict(_images(8, 3)[0], alpha=0.1)
    assert decision.is_ood.shape == (8,) and decision.score == result.best.calibration_.score


@pytest.mark.parametrize("which", ["train", "val"])
def test_calibrating_tune_on_its_own_images_is_refused_before_any_work(data, which):
    model, train, val = data
    loader = {"train": train, "val": val}[which]
    with pytest.raises(ValueError, match=f"calibration_loader is {which}_loader.*Hold out"):
        tune(model, train, val, calibration_loader=loader, time_budget=1e-9, **FAST)


def test_screening_promotes_by_the_same_rule():
    """The screened fine-tune that ranks best goes on, not the one with the lowest mean FPR95."""
    from types import SimpleNamespace

    from oodunleash.tuning import schedule

    screened = {"blunt": BLUNT, "sharp": SHARP}  # blunt: lower mean FPR95; sharp: better rank
    specs = [SimpleNamespace(name=n, method="um", priority=i) for i, n in enumerate(screened)]

    def read(spec, unleashed, xi, train_s):
        return CandidateResult(spec.name, "finetune", 2, 90.0, {"knn": screened[spec.name]})

    search = SimpleNamespace(
        train_loader=[None] * 8,
        promote=1,
        max_accuracy_drop=1.0,
        epoch_s={},
        pass_s=0.0,
        reader=SimpleNamespace(read_s=0.0),
        build=lambda spec, loader, epochs: (spec.name, None),
        duplicate=lambda name, unleashed, seen: None,
        screen_reader=SimpleNamespace(read=read),
    )
    dropped: dict[str, str] = {}
    promoted = schedule.screen(search, specs, 90.0, 0.0, None, dropped)
    assert [s.name for s in promoted] == ["sharp"]
    assert list(dropped) == ["blunt"] and "sharp did better" in dropped["blunt"]

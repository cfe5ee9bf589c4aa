"""Which selection rule should ``tune`` use? Judged on validation data only.

``tune`` picks a (candidate, score) pair from its metrics on several validation OOD sets. A rule
that fits those sets well can still generalise badly to an OOD family it has not seen, which is
what a user meets. This script measures that with the sets ``tune`` already has: leave one
validation OOD set out, choose with each rule on the others, and read the held-out set's FPR95
of the choice against the best pair there (the *regret*). No test set is read.

Input: the ``seed*.json`` files that ``examples/benchmark_tune.py --out DIR`` writes (the
``val`` block, which is ``TuneResult.to_dict()``).

    python examples/benchmark_choice_rule.py runs/tune runs/tune_r18 runs/tune_cnn12k
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from collections.abc import Callable, Mapping
from statistics import mean

from oodunleash.tuning.result import MEAN, CandidateResult, mean_ranks, select

Metrics = Mapping[str, Mapping[str, Mapping[str, float]]]  # {score: {ood set: {auroc, fpr95}}}
Rule = Callable[[Metrics], list[str]]  # scores best first


def _keep(metrics: Metrics, sets: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """``metrics`` restricted to ``sets``, the mean recomputed over them."""
    out = {}
    for score, per_set in metrics.items():
        rows = {s: dict(per_set[s]) for s in sets}
        rows[MEAN] = {k: mean(r[k] for r in rows.values()) for k in ("auroc", "fpr95")}
        out[score] = rows
    return out


def by_mean(key: str, sign: float) -> Rule:
    """Rank by the mean over sets of ``key`` (``sign`` -1: higher is better)."""
    return lambda m: sorted(m, key=lambda s: sign * m[s][MEAN][key])


def by_worst_fpr95(m: Metrics) -> list[str]:
    return sorted(m, key=lambda s: max(v["fpr95"] for k, v in m[s].items() if k != MEAN))


def by_mean_log_fpr95(m: Metrics) -> list[str]:
    logs = {s: mean(math.log1p(v["fpr95"]) for k, v in m[s].items() if k != MEAN) for s in m}
    return sorted(m, key=logs.__getitem__)


def by_mean_rank_of_fpr95(m: Metrics) -> list[str]:
    """Like tune's rule, but each set ranks the scores by FPR95 (lower is better)."""
    flipped = {s: {k: {"auroc": -v["fpr95"]} for k, v in m[s].items()} for s in m}
    ranks = mean_ranks(flipped)
    return sorted(m, key=lambda s: (ranks[s], m[s][MEAN]["fpr95"]))


def choose(run: Mapping, sets: list[str], rule: Rule | None, unchanged_only: bool) -> tuple:
    """The (candidate, score) a rule picks on ``sets``: each candidate's best score, then the
    best candidate under the same rule among the eligible ones. ``rule=None``: the library's
    own rule (:func:`oodunleash.tuning.result.select`)."""
    rows = []
    for name, c in run["candidates"].items():
        if not c["eligible"] or (unchanged_only and c["kind"] != "unchanged"):
            continue
        kind_tier = {"unchanged": 0, "checkpoint": 1}.get(c["kind"], 2)
        rows.append(
            CandidateResult(name, c["kind"], kind_tier, c["accuracy"], _keep(c["scores"], sets))
        )
    if rule is None:
        chosen = select(rows, max_accuracy_drop=float("inf"))[0]
        return chosen.name, chosen.best_score
    best = {r.name: (r, rule(r.metrics)[0]) for r in rows}
    name = rule({n: r.metrics[s] for n, (r, s) in best.items()})[0]
    return name, best[name][1]


RULES: dict[str, Rule | None] = {
    "mean rank of AUROC (tune's rule)": None,
    "mean FPR95 (tune's rule before)": by_mean("fpr95", 1.0),
    "mean rank of FPR95": by_mean_rank_of_fpr95,
    "mean AUROC": by_mean("auroc", -1.0),
    "mean log(1 + FPR95)": by_mean_log_fpr95,
    "worst FPR95": by_worst_fpr95,
}


def held_out_regret(run: Mapping, rule: Rule | None, unchanged_only: bool) -> list[float]:
    """Per validation OOD set that separates the pairs: the held-out regret of ``rule``."""
    sets = list(run["ood_sets"])
    eligible = [c for c in run["candidates"].values() if c["eligible"]]
    out = []
    for held in sets:
        values = [m[held]["fpr95"] for c in eligible for m in c["scores"].values()]
        if max(values) - min(values) < 1e-9:
            continue  # every pair equal there: nothing to learn from it
        name, score = choose(run, [s for s in sets if s != held], rule, unchanged_only)
        out.append(run["candidates"][name]["scores"][score][held]["fpr95"] - min(values))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="output folders of examples/benchmark_tune.py")
    args = parser.parse_args()
    runs = {
        f"{d}/{p.stem}": json.loads(p.read_text())["val"]
        for d in args.dirs
        for p in sorted(pathlib.Path(d).glob("seed*.json"))
    }
    print(
        f"Held-out regret in FPR95 points (lower is better): {len(runs)} runs, each validation "
        "OOD set left out in turn; mean over the held-out sets, then per folder.\n"
    )
    print("| rule | candidates | mean | " + " | ".join(args.dirs) + " |")
    print("|---|---|---:|" + "---:|" * len(args.dirs))
    for label, rule in RULES.items():
        for unchanged_only in (False, True):
            per_dir = {d: [] for d in args.dirs}
            for key, run in runs.items():
                per_dir[key.rsplit("/", 1)[0]] += held_out_regret(run, rule, unchanged_only)
            every = [x for v in per_dir.values() for x in v]
            cells = [f"{mean(v):.1f}" for v in per_dir.values()]
            space = "unchanged model only" if unchanged_only else "all"
            print(
                f"| {label} | {space} | {mean(every):.1f} (n={len(every)}) | "
                + " | ".join(cells)
                + " |"
            )


if __name__ == "__main__":
    main()

"""Summarising a benchmark run: per-seed results into ``results.json``, ``results.md`` and
plots, the validation-only choice of fine-tune, and each fine-tune's trade-off against the
final model of the same seed."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import numpy as np

from oodunleash.bench.comparisons import (
    _accuracy_change,
    _common_runs,
    _mean_auroc,
    _mean_fpr,
    _paired,
    rows_of,
    tradeoff,
)
from oodunleash.bench.grid import from_name
from oodunleash.bench.plots import plot_setting
from oodunleash.evaluation.results import format_mean_std, mean_std
from oodunleash.runtime.files import write_atomic

__all__ = ["select_configs", "summarize", "tradeoff"]


def _partial_runs(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs only some seeds finished (a deadline, or resumes with different grids), each
    compared with the final model *of the same seeds*, so that no seed's luck is compared
    with another's."""
    common = set(_common_runs(rs))
    names = [n for r in rs for n in r["runs"] if n not in common]
    rows = []
    for name in dict.fromkeys(names):
        row: dict[str, Any] = {"name": name}
        for split in ("val", "test"):
            row["seeds"], runs, finals = _paired(rs, name, split)
            row[split] = {
                "accuracy_change": _accuracy_change(runs, finals),
                "mean_auroc": mean_std([_mean_auroc(b) for b in runs]),
                "mean_fpr95": mean_std([_mean_fpr(b) for b in runs]),
                "final_mean_fpr95": mean_std([_mean_fpr(b) for b in finals]),
            }
        rows.append(row)
    return rows


def select_configs(per_seed: list[dict[str, Any]], max_acc_drop: float = 1.0) -> dict[str, str]:
    """Validation-only choice per method: the fine-tune with the lowest mean (over seeds and
    validation OOD sets) Energy FPR95 whose mean validation accuracy is within
    ``max_acc_drop`` points of the final model's (if none is, the one with the highest
    validation accuracy). Returns ``{"um": name, "umap": name, ...}`` plus the matching
    controls (the same fine-tune with ``xi="control"``)."""
    names = [n for n in _common_runs(per_seed) if n != "final"]
    base_acc = np.mean([r["runs"]["final"]["val"]["accuracy"] for r in per_seed])
    chosen: dict[str, str] = {}
    for method in ("um", "umap"):
        best, best_fpr, best_acc, most_acc = None, math.inf, None, -math.inf
        for n in names:
            cfg = per_seed[0]["runs"][n]["config"]
            if cfg["method"] != method or cfg["xi"] == "control":
                continue
            acc = np.mean([r["runs"][n]["val"]["accuracy"] for r in per_seed])
            fpr = np.mean([_mean_fpr(r["runs"][n]["val"]) for r in per_seed])
            if acc >= base_acc - max_acc_drop and fpr < best_fpr:
                best, best_fpr = n, fpr
            if acc > most_acc:
                best_acc, most_acc = n, acc
        best = best or best_acc
        if best is None:
            continue
        chosen[method] = best
        control = from_name(best).control().name
        # Only a control every seed finished: one a time budget skipped on some seeds would
        # be compared over other seeds than the fine-tune (it is listed as a partial run).
        if control in names:
            chosen[f"{method}_control"] = control
    return chosen


def summarize(out_dir: str | os.PathLike[str], wall_time_s: float | None = None) -> dict[str, Any]:
    """Aggregate ``<out_dir>/seeds/*.json`` into ``results.json``, ``results.md`` and plots."""
    out = pathlib.Path(out_dir)
    files = sorted((out / "seeds").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"No per-seed results under {out / 'seeds'}.")
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for f in files:
        r = json.loads(f.read_text())
        by_setting.setdefault(r["setting"], []).append(r)
    summary: dict[str, Any] = {"wall_time_s": wall_time_s, "settings": {}}
    md = ["# Benchmark results", ""]
    if wall_time_s is not None:
        md += [f"Wall time: {wall_time_s / 60:.1f} min.", ""]
    for setting, rs in by_setting.items():
        rs.sort(key=lambda r: r["seed"])
        chosen = select_configs(rs)
        s_sum = _summarize_setting(rs, chosen)
        summary["settings"][setting] = s_sum
        md += _setting_markdown(setting, rs, chosen, s_sum)
        plot_setting(out, setting, rs, chosen)
    write_atomic(out / "results.json", json.dumps(summary, indent=1))
    write_atomic(out / "results.md", "\n".join(md) + "\n")
    return summary


def _summarize_setting(rs: list[dict[str, Any]], chosen: dict[str, str]) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for name in _common_runs(rs):
        entry: dict[str, Any] = {}
        for split in ("val", "test"):
            blocks = [r["runs"][name][split] for r in rs]
            scores = blocks[0]["metrics"]
            entry[split] = {
                "accuracy": mean_std([b["accuracy"] for b in blocks]),
                "metrics": {
                    s: {
                        ood: {
                            m: mean_std([b["metrics"][s][ood][m] for b in blocks])
                            for m in scores[s][ood]
                        }
                        for ood in scores[s]
                    }
                    for s in scores
                },
                "mean_fpr95": {s: mean_std([_mean_fpr(b, s) for b in blocks]) for s in scores},
                "mean_auroc": {s: mean_std([_mean_auroc(b, s) for b in blocks]) for s in scores},
            }
        runs[name] = entry
    xis = {k: mean_std([r["xi"][k] for r in rs]) for k in rs[0]["xi"]}
    return {
        "seeds": [r["seed"] for r in rs],
        "chosen": chosen,
        "xi": xis,
        "runs": runs,
        "partial_runs": _partial_runs(rs),
    }


def _setting_markdown(
    setting: str, rs: list[dict[str, Any]], chosen: dict[str, str], s_sum: dict[str, Any]
) -> list[str]:
    return (
        _header_markdown(setting, rs)
        + _test_markdown(rs, chosen)
        + _validation_markdown(rs, chosen)
        + _partial_markdown(s_sum["partial_runs"])
    )


def _header_markdown(setting: str, rs: list[dict[str, Any]]) -> list[str]:
    """The setting's title line, its ξ values and the fine-tunes the library refused."""
    seeds = ", ".join(str(r["seed"]) for r in rs)
    # Seeds run on different machines can be summarised together (the same protocol).
    devices = ", ".join(dict.fromkeys(r["device"] for r in rs))
    r0 = rs[0]
    md = [
        f"## {setting} ({r0['dataset']}, {r0['epochs']} epochs, label noise "
        f"{r0['label_noise']:g}, seeds {seeds}, device {devices})",
        "",
        "ξ recipes (mean ± std over seeds): "
        + ", ".join(f"{k} {format_mean_std([r['xi'][k] for r in rs], 4)}" for k in r0["xi"]),
        "",
    ]
    refused: dict[str, list[str]] = {}
    for r in rs:
        for name in r.get("refused", {}):
            refused.setdefault(name, []).append(str(r["seed"]))
    if refused:
        md += [
            "Refused before any step (ξ at or above the loss of a uniform guess): "
            + ", ".join(f"{n} (seeds {', '.join(s)})" for n, s in refused.items()),
            "",
        ]
    return md


def _test_markdown(rs: list[dict[str, Any]], chosen: dict[str, str]) -> list[str]:
    """The test tables: Energy per OOD set, then every score over the OOD sets."""
    md = ["### Test: Energy, per OOD set (AUROC / FPR95), mean over seeds", ""]
    final = rs[0]["runs"]["final"]["test"]["metrics"]
    oods = list(final["energy"])
    md.append("| model | ID acc | " + " | ".join(oods) + " | mean AUROC | mean FPR95 |")
    md.append("|---" * (len(oods) + 4) + "|")
    for label, name in rows_of(rs, chosen):
        blocks = [r["runs"][name]["test"] for r in rs]
        cells = []
        for ood in oods:
            a = np.mean([b["metrics"]["energy"][ood]["auroc"] for b in blocks])
            f = np.mean([b["metrics"]["energy"][ood]["fpr95"] for b in blocks])
            cells.append(f"{a:.1f} / {f:.1f}")
        md.append(
            f"| {label} | {format_mean_std([b['accuracy'] for b in blocks], 2)} | "
            + " | ".join(cells)
            + f" | {format_mean_std([_mean_auroc(b) for b in blocks])}"
            + f" | {format_mean_std([_mean_fpr(b) for b in blocks])} |"
        )
    scores = list(final)
    md += [
        "",
        "### Test: every score, mean over OOD sets (AUROC / FPR95), mean ± std over seeds",
        "",
        "| model | " + " | ".join(scores) + " |",
        "|---" * (len(scores) + 1) + "|",
    ]
    for label, name in rows_of(rs, chosen):
        blocks = [r["runs"][name]["test"] for r in rs]
        cells = [
            f"{format_mean_std([_mean_auroc(b, s) for b in blocks])} / "
            f"{format_mean_std([_mean_fpr(b, s) for b in blocks])}"
            for s in scores
        ]
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    return md


def _validation_markdown(rs: list[dict[str, Any]], chosen: dict[str, str]) -> list[str]:
    """The validation sweep: every fine-tune all seeds finished, the chosen ones marked."""
    md = [
        "",
        "### Validation sweep (the only numbers choices were made on): Energy, mean over "
        "validation OOD sets",
        "",
        "| fine-tune | ξ (mean) | val ID acc | val mean AUROC | val mean FPR95 | "
        "final train-mode CE |",
        "|---|---|---|---|---|---|",
    ]
    for name in _common_runs(rs):
        blocks = [r["runs"][name]["val"] for r in rs]
        xis = [r["runs"][name].get("xi_value") for r in rs]
        # A control has no ξ (older results stored 1e-12 for it).
        controlled = name != "final" and rs[0]["runs"][name]["config"]["xi"] == "control"
        xi = "-" if name == "final" or controlled else f"{np.mean(xis):.4f}"
        ce = (
            "-"
            if name == "final"
            else f"{np.mean([r['runs'][name]['history'][-1]['ce'] for r in rs]):.4f}"
        )
        mark = ""
        if name in (chosen.get("um"), chosen.get("umap")):
            mark = " **(chosen)**"
        elif name in chosen.values():
            mark = " (its control)"
        md.append(
            f"| {name}{mark} | {xi} | {format_mean_std([b['accuracy'] for b in blocks], 2)} | "
            f"{format_mean_std([_mean_auroc(b) for b in blocks])} | "
            f"{format_mean_std([_mean_fpr(b) for b in blocks])} | {ce} |"
        )
    md.append("")
    return md


def _signed(pair: tuple[float, float], digits: int = 1) -> str:
    return f"{pair[0]:+.{digits}f} ± {pair[1]:.{digits}f}"


def _partial_markdown(partial_runs: list[dict[str, Any]]) -> list[str]:
    """Fine-tunes only some seeds finished, each against the final model of those seeds."""
    if not partial_runs:
        return []
    md = [
        "### Fine-tunes only some seeds finished: Energy, each against the final model of "
        "the same seeds",
        "",
        "| fine-tune | seeds | val acc change | val mean FPR95 (final → run) | "
        "test acc change | test mean AUROC | test mean FPR95 (final → run) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in partial_runs:
        val, test = row["val"], row["test"]
        md.append(
            f"| {row['name']} | {', '.join(map(str, row['seeds']))} | "
            f"{_signed(val['accuracy_change'], 2)} | {val['final_mean_fpr95'][0]:.1f} → "
            f"{val['mean_fpr95'][0]:.1f} | {_signed(test['accuracy_change'], 2)} | "
            f"{test['mean_auroc'][0]:.1f} | {test['final_mean_fpr95'][0]:.1f} → "
            f"{test['mean_fpr95'][0]:.1f} ± {test['mean_fpr95'][1]:.1f} |"
        )
    md.append("")
    return md

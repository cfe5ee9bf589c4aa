"""The model card: ``huggingface_hub.ModelCard`` rendered from this package's template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["model_card"]

_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

An image classifier fine-tuned with **Unleashing Mask** ({{ method | upper }}; Zhu et al., ICML
2023) to restore its out-of-distribution (OOD) detection: the fine-tune keeps the ID training
loss near the constraint ξ instead of driving it to zero, so the model forgets memorised
atypical samples. Made with oodunleash.

## Results

{{ results }}

## How it was made

| | |
|---|---|
{% for key, value in rows -%}
| {{ key }} | {{ value }} |
{% endfor %}
## Usage

```python
from oodunleash import OODUnleash

{% if is_timm -%}
unleashed = OODUnleash.from_pretrained("{{ repo }}")
{%- else -%}
# {{ model_class }} is a custom architecture: pass it in.
unleashed = OODUnleash.from_pretrained("{{ repo }}", model=MyNet)
{%- endif %}
# images: a preprocessed batch, shaped (N, C, H, W) as in training
scores = unleashed.score(images)  # {{ score }}; higher = more in-distribution
```
{% if is_timm %}
The repo is also a plain timm checkpoint (no oodunleash needed):

```python
import timm

model = timm.create_model("hf-hub:{{ repo }}", pretrained=True)
```
{% endif %}
## Files

{% for name in files -%}
- `{{ name }}`
{% endfor %}
## Citation

```bibtex
@inproceedings{zhu2023unleashing,
  title={Unleashing Mask: Explore the Intrinsic Out-of-Distribution Detection Capability},
  author={Zhu, Jianing and Li, Hengzhuang and Yao, Jiangchao and Liu, Tongliang and Xu, Jianliang and Han, Bo},
  booktitle={International Conference on Machine Learning},
  year={2023}
}
```
"""

_METHODS = {"um": "UM (weights fine-tuned)", "umap": "UMAP (pruning mask learnt)"}


def _score_label(recorded: Any) -> str:
    """The recorded default score as a label (``knn k=1``), not its JSON."""
    from oodunleash.scores.spec import ScoreSpec

    try:
        return ScoreSpec.from_json(recorded).label
    except (TypeError, ValueError):  # a score this version does not know: show what is recorded
        return str(recorded.get("name", recorded) if isinstance(recorded, Mapping) else recorded)


def _rows(config: Mapping[str, Any], architecture: str, is_timm: bool) -> list[tuple[str, str]]:
    params = config["params"]
    xi = config["loss_constraint"]
    rows = [
        ("Architecture", f"`{architecture}`" + (" (timm)" if is_timm else " (custom)")),
        ("Method", _METHODS.get(params["method"], params["method"])),
        (
            "Loss constraint ξ",
            "not fitted (post-hoc scores only)"
            if not config["fitted"]
            else "none (plain cross-entropy control)"
            if xi is None
            else f"{xi:.4g}",
        ),
        ("Masked layers", str(len(config["layer_names"]))),
        ("Default OOD score", f"`{_score_label(params.get('score', 'energy'))}`"),
    ]
    masks = config["masks"]
    if masks is not None:
        rows.insert(3, ("Keep ratio", f"{masks['keep_ratio']:g} ({masks['mode']}-wise)"))
        rows.append(("Sparsity of masked layers", f"{masks['sparsity']:.1%}"))
    train_cfg = config["training"]["config"] or {}
    if train_cfg:
        rows.append(
            (
                "Fine-tune",
                f"{train_cfg.get('epochs')} epochs, {train_cfg.get('optimizer')}, "
                f"lr {train_cfg.get('lr')}, {train_cfg.get('schedule')} schedule",
            )
        )
    history = config["training"]["history"]
    if history and "accuracy" in history[-1]:
        rows.append(("Final train accuracy", f"{history[-1]['accuracy']:.2%}"))
    if config["preprocessing"]:
        shown = ", ".join(f"{k} {v}" for k, v in config["preprocessing"].items())
        rows.append(("Preprocessing", shown))
    if config["scores"]:
        rows.append(("Fitted scores", ", ".join(f"`{k}`" for k in config["scores"])))
    if config["class_names"]:
        names = config["class_names"]
        more = f" (+{len(names) - 20} more)" if len(names) > 20 else ""
        rows.append(("Classes", ", ".join(names[:20]) + more))
    rows.append(("oodunleash", config["oodunleash_version"]))
    return rows


def model_card(
    config: Mapping[str, Any],
    results_markdown: str | None,
    *,
    is_timm: bool,
    repo_id: str | None,
    base_model: str | None,
    datasets: Sequence[str] | None,
    license: str | None,  # noqa: A002 - the model card field's name
    card_data: Mapping[str, Any] | None,
) -> str:
    """The text of ``README.md`` for the checkpoint described by ``config``."""
    from huggingface_hub import ModelCard, ModelCardData

    method = config["params"]["method"]
    tags = ["ood-detection", "unleashing-mask", "oodunleash", method] + (
        ["timm"] if is_timm else []
    )
    metadata: dict[str, Any] = {
        "library_name": "oodunleash",
        "pipeline_tag": "image-classification",
        "tags": tags,
    }
    if base_model:
        metadata["base_model"] = base_model
    if datasets:
        metadata["datasets"] = list(datasets)
    if license:
        metadata["license"] = license
    if results_markdown is not None:
        metadata["metrics"] = ["auroc", "aupr_in", "aupr_out", "fpr95", "accuracy"]
    metadata.update(dict(card_data or {}))
    model_info = config["model"]
    architecture = model_info.get("architecture") or model_info["class"]
    card = ModelCard.from_template(
        ModelCardData(**metadata),
        template_str=_TEMPLATE,
        title=repo_id.split("/")[-1] if repo_id else f"Unleashed {architecture}",
        method=method,
        results=results_markdown or "No evaluation was recorded before saving.",
        rows=_rows(config, architecture, is_timm),
        is_timm=is_timm,
        repo=repo_id or "<repo_id>",
        model_class=model_info["class"],
        score=_score_label(config["params"].get("score", "energy")),
        files=list(config["files"]),
    )
    return str(card)

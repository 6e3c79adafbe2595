"""Renders an evaluation run as Markdown and as a self-contained HTML page with plots, and writes
both with the run's raw results as JSON."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from gateway.evaluation.results import ArmResult, EvalRun, KnowledgeUpdate, QuestionResult
from gateway.evaluation.summary import summarize_arm

MISSING = "—"


def _summary(arm: ArmResult) -> dict:
    return arm.summary or summarize_arm(arm.questions)


def _num(value: float | None, digits: int = 3) -> str:
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _with_ci(metric: dict) -> str:
    if metric["mean"] is None:
        return MISSING
    return f"{metric['mean']:.3f} [{_num(metric['ci_low'])}, {_num(metric['ci_high'])}]"


def _optional(metric: dict) -> str:
    return MISSING if metric["mean"] is None else f"{metric['mean']:.3f} (n={metric['n']})"


def _pair(metric: dict) -> str:
    return f"{_num(metric['p50'], 0)} / {_num(metric['p95'], 0)}"


def _rows(top_k: int) -> list[tuple[str, Callable[[dict], str]]]:
    """The side-by-side table: one row per number, one column per arm."""
    return [
        ("Exact match [95% CI]", lambda s: _with_ci(s["exact_match"])),
        ("Token F1 [95% CI]", lambda s: _with_ci(s["token_f1"])),
        ("ROUGE-L [95% CI]", lambda s: _with_ci(s["rouge_l"])),
        (f"Recall@{top_k}", lambda s: _optional(s["recall_at_k"])),
        ("MRR", lambda s: _optional(s["mrr"])),
        ("Citation precision", lambda s: _optional(s["citation_precision"])),
        ("TTFT p50 / p95 (ms)", lambda s: _pair(s["ttft_ms"])),
        ("Total p50 / p95 (ms)", lambda s: _pair(s["total_ms"])),
        ("Prompt tokens (mean)", lambda s: _num(s["prompt_tokens"], 1)),
        ("Completion tokens (mean)", lambda s: _num(s["completion_tokens"], 1)),
        ("Compute s per answer", lambda s: _num(s["compute_s"], 2)),
        ("Failed questions", lambda s: f"{s['failed']} of {s['questions']}"),
    ]


def _arm_table(run: EvalRun) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the arms table; a failed arm keeps its column, marked FAILED with its error."""
    header = ["", *(arm.name for arm in run.arms)]
    rows = [["Status", *(f"FAILED: {arm.error or 'no error given'}" if arm.failed else "ok" for arm in run.arms)]]
    for label, cell in _rows(run.top_k):
        rows.append([label, *(MISSING if arm.failed else cell(_summary(arm)) for arm in run.arms)])
    return header, rows


def _answer_cell(arm: ArmResult, result: QuestionResult | None) -> str:
    if arm.failed:
        return "FAILED"
    if result is None:
        return MISSING
    if result.error:
        return f"FAILED: {result.error}"
    return f"{result.answer} (F1 {result.token_f1:.2f})"


def _question_table(run: EvalRun) -> tuple[list[str], list[list[str]]]:
    """One row per question (in the order first seen), one answer column per arm."""
    by_arm = {arm.name: {q.item_id: q for q in arm.questions} for arm in run.arms}
    order: dict[str, QuestionResult] = {}
    for arm in run.arms:
        for result in arm.questions:
            order.setdefault(result.item_id, result)
    header = ["id", "question", "references", *(f"{arm.name} (F1)" for arm in run.arms)]
    rows = [
        [item_id, first.question, " / ".join(first.references),
         *(_answer_cell(arm, by_arm[arm.name].get(item_id)) for arm in run.arms)]
        for item_id, first in order.items()
    ]
    return header, rows


def _update_lines(run: EvalRun) -> list[str]:
    update = run.knowledge_update
    if update is None:
        return ["The knowledge-update cost was not measured in this run."]
    lines = [f"New facts: {update.facts}"]
    if update.error:
        lines.append(f"FAILED: {update.error}")
    lines.append(f"RAG (ingest): {_num(update.rag_seconds, 1)} s")
    lines.append(f"Fine-tuning (a training job): {_num(update.finetune_seconds, 1)} s")
    if update.rag_seconds and update.finetune_seconds:
        lines.append(f"Fine-tuning took {update.finetune_seconds / update.rag_seconds:.1f}x as long as ingesting")
    for label, quality in (("RAG", update.rag_quality), ("fine-tuned", update.finetune_quality)):
        if quality:
            scores = ", ".join(f"{name} {_num(value)}" for name, value in quality.items())
            lines.append(f"Quality through {label} afterwards: {scores}")
    return lines


def _drivers_json(run: EvalRun) -> str:
    return json.dumps(_json_ready(run.recommendation.drivers), indent=2, sort_keys=True)


# --- plots ---------------------------------------------------------------------------------------


def _figure(width: float = 7.5, height: float = 3.6):
    # A bare Figure draws with Agg and touches no pyplot state, so reports render from any thread.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" text chunk: it would carry matplotlib's web address into the page.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _grouped_bars(axes, run: EvalRun, series: list[tuple[str, Callable[[dict], tuple[float, float, float]]]]) -> None:
    """One group per arm, one bar per series; `series` yields (height, error below, error above)."""
    width = 0.8 / len(series)
    positions = range(len(run.arms))
    for index, (label, values) in enumerate(series):
        heights, below, above = [], [], []
        for arm in run.arms:
            height, low, high = (math.nan, 0.0, 0.0) if arm.failed else values(_summary(arm))
            heights.append(height)
            below.append(low)
            above.append(high)
        offsets = [x - 0.4 + width * (index + 0.5) for x in positions]
        errors = [below, above] if any(below) or any(above) else None
        axes.bar(offsets, heights, width, label=label, yerr=errors, capsize=3)
    for x, arm in zip(positions, run.arms):
        if arm.failed:
            axes.text(x, 0, "FAILED", ha="center", va="bottom", color="#b00020", fontweight="bold")
    axes.set_xticks(list(positions), [arm.name for arm in run.arms])
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))


def _mean_and_ci(metric: dict) -> tuple[float, float, float]:
    mean = metric["mean"]
    if mean is None:
        return (math.nan, 0.0, 0.0)
    return (mean, max(mean - metric["ci_low"], 0.0), max(metric["ci_high"] - mean, 0.0))


def _quality_png(run: EvalRun) -> bytes:
    figure = _figure()
    axes = figure.add_subplot()
    _grouped_bars(axes, run, [
        ("exact match", lambda s: _mean_and_ci(s["exact_match"])),
        ("token F1", lambda s: _mean_and_ci(s["token_f1"])),
        ("ROUGE-L", lambda s: _mean_and_ci(s["rouge_l"])),
    ])
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("score (mean, 95% CI)")
    return _png(figure)


def _latency(metric: dict, key: str) -> tuple[float, float, float]:
    value = metric[key]
    return (math.nan if value is None else value, 0.0, 0.0)


def _latency_png(run: EvalRun) -> bytes:
    figure = _figure()
    axes = figure.add_subplot()
    _grouped_bars(axes, run, [
        ("TTFT p50", lambda s: _latency(s["ttft_ms"], "p50")),
        ("TTFT p95", lambda s: _latency(s["ttft_ms"], "p95")),
        ("total p50", lambda s: _latency(s["total_ms"], "p50")),
        ("total p95", lambda s: _latency(s["total_ms"], "p95")),
    ])
    axes.set_ylabel("milliseconds")
    return _png(figure)


def _knowledge_update_png(update: KnowledgeUpdate) -> bytes | None:
    if update.rag_seconds is None and update.finetune_seconds is None:
        return None
    figure = _figure(5, 2.4)
    axes = figure.add_subplot()
    labels = ["RAG (ingest)", "fine-tuning (job)"]
    seconds = [update.rag_seconds or 0.0, update.finetune_seconds or 0.0]
    axes.barh(labels, seconds, color=["#4c72b0", "#dd8452"])
    axes.set_xlabel(f"seconds to make {update.facts} new facts answerable")
    return _png(figure)


# --- Markdown --------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]


def render_markdown(run: EvalRun) -> str:
    """The whole report as GitHub-flavoured Markdown."""
    lines = [
        f"# ragtune evaluation {run.id}", "",
        f"Collection `{run.collection}`, adapter `{run.adapter}`, top_k {run.top_k}"
        + (f", created {run.created_time}" if run.created_time else "") + ".",
        f"Constraints: data changes {run.constraints.data_change}, latency budget "
        f"{_num(run.constraints.latency_budget_ms, 0)} ms (p95), cost budget "
        f"{_num(run.constraints.cost_budget_tokens, 0)} tokens per answer.", "",
        "## Recommendation", "",
    ]
    if run.recommendation is None:
        lines.append("No recommendation was computed for this run.")
    else:
        lines += [f"**{run.recommendation.arm}**", ""]
        lines += [f"- {_md_cell(reason)}" for reason in run.recommendation.reasons]
        lines += ["", "Numbers that drove it:", "", "```json", _drivers_json(run), "```"]
    lines += ["", "## Arms side by side", "", *_md_table(*_arm_table(run)), ""]
    lines += ["## Knowledge-update cost", "", *(f"- {_md_cell(line)}" for line in _update_lines(run)), ""]
    lines += ["## Per question", "", *_md_table(*_question_table(run)), ""]
    return "\n".join(lines)


# --- HTML --------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 80rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
.failed { color: #b00020; font-weight: bold; }
.pick { font-size: 1.4rem; font-weight: bold; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; }
img { max-width: 100%; }
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(tag: str, text: str) -> str:
        css = ' class="failed"' if text.startswith("FAILED") else ""
        return f"<{tag}{css}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", h) for h in header)
    body = "".join("<tr>" + "".join(cell("td", c) for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(run: EvalRun) -> str:
    """The whole report as one HTML page: inline CSS, plots as inline PNGs, nothing fetched."""
    esc = html.escape
    plots = [("Answer quality per arm (95% CI)", _quality_png(run)), ("Latency per arm", _latency_png(run))]
    if run.knowledge_update is not None and (update_png := _knowledge_update_png(run.knowledge_update)):
        plots.append(("Knowledge-update cost", update_png))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>ragtune evaluation {esc(run.id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>ragtune evaluation {esc(run.id)}</h1>",
        f"<p>Collection <code>{esc(run.collection)}</code>, adapter <code>{esc(run.adapter)}</code>, top_k "
        f"{run.top_k}{', created ' + esc(run.created_time) if run.created_time else ''}. Data changes "
        f"{esc(run.constraints.data_change)}; latency budget {_num(run.constraints.latency_budget_ms, 0)} ms (p95); "
        f"cost budget {_num(run.constraints.cost_budget_tokens, 0)} tokens per answer.</p>",
        "<h2>Recommendation</h2>",
    ]
    if run.recommendation is None:
        parts.append("<p>No recommendation was computed for this run.</p>")
    else:
        parts.append(f'<p class="pick">{esc(run.recommendation.arm)}</p><ul>')
        parts += [f"<li>{esc(reason)}</li>" for reason in run.recommendation.reasons]
        parts.append(f"</ul><p>Numbers that drove it:</p><pre>{esc(_drivers_json(run))}</pre>")
    parts += ["<h2>Arms side by side</h2>", _html_table(*_arm_table(run))]
    for title, png in plots:
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(f'<h3>{esc(title)}</h3><img alt="{esc(title)}" src="data:image/png;base64,{encoded}">')
    parts += ["<h2>Knowledge-update cost</h2><ul>", *(f"<li>{esc(line)}</li>" for line in _update_lines(run)), "</ul>"]
    parts += ["<h2>Per question</h2>", _html_table(*_question_table(run)), "</body></html>"]
    return "\n".join(parts)


# --- files -------------------------------------------------------------------------------------------


def _json_ready(value):
    """NaN and infinity become null: JSON has no spelling for them that browsers and jq accept."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def _write_atomically(path: Path, text: str) -> None:
    # A reader (or a crash mid-write) never sees half a report: the file appears whole or not at all.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_report(run: EvalRun, folder: Path) -> dict[str, Path]:
    """Writes report.md, report.html and results.json (the run, every arm's summary filled in) into
    `folder`; returns their paths under the keys "markdown", "html" and "results"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = dataclasses.asdict(run)
    for arm, dumped in zip(run.arms, payload["arms"]):
        if not arm.failed and not dumped["summary"]:
            dumped["summary"] = summarize_arm(arm.questions)
    contents = {
        "markdown": ("report.md", render_markdown(run)),
        "html": ("report.html", render_html(run)),
        "results": ("results.json", json.dumps(_json_ready(payload), indent=2, allow_nan=False)),
    }
    paths = {}
    for key, (name, text) in contents.items():
        paths[key] = folder / name
        _write_atomically(paths[key], text)
    return paths

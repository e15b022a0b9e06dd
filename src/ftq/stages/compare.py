"""Stage `compare`: every evaluated candidate side by side.

Reads reports/eval/<candidate>.json and .answers.jsonl (base, merged, and the builds stage ladder
evaluated, in reports/eval/builds/) and reports/ladder.json, and writes
  reports/compare.md      one table of all metrics for all candidates, retention vs. `merged` in %, the
                          quantization ladder (every build: size, KLD, top-1, screen, evaluated or why
                          not, metric vs merged), and the answers of every candidate to the same prompts
  reports/compare.html    the same, self-contained (charts inlined as base64 PNG)
  reports/compare/*.png   one bar chart per metric group; ladder.png, size against KL divergence and
                          against the task metric, the Pareto front marked
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any

from ftq.io import atomic_write_text, save_figure
from ftq.params import repo_root

log = logging.getLogger(__name__)

EVAL_ROOT = Path("reports/eval")
LADDER = Path("reports/ladder.json")
MARKDOWN = Path("reports/compare.md")
HTML = Path("reports/compare.html")
CHART_ROOT = Path("reports/compare")
# (key, label, higher is better)
METRICS = [
    ("task_exact_match", "task exact match", True),
    ("task_json_valid", "JSON valid", True),
    ("task_json_field_accuracy", "JSON field accuracy", True),
    ("task_rouge_l", "ROUGE-L", True),
    ("task_tool_call_name_accuracy", "tool call: function name", True),
    ("task_tool_call_exact", "tool call: name and arguments", True),
    ("task_tool_call_abstained", "tool call: none where none is needed", True),
    ("general_accuracy", "general questions", True),
    ("pref_accuracy", "preference pairs: reward ranks chosen", True),
    ("pref_logp_accuracy", "preference pairs: chosen more likely", True),
    ("pref_reward_margin", "preference pairs: reward margin", True),
    ("mt_bench_score", "MT-Bench (1-10)", True),
    ("perplexity", "held-out perplexity", False),
    ("size_bytes", "size (MB)", False),
    ("load_seconds", "load s", False),
    ("ttft_seconds_p50", "TTFT p50 s", False),
    ("relative_tokens_per_second", "speed vs merged (x)", True),
    ("tokens_per_second", "tokens/s (median)", True),
    ("peak_memory_bytes", "peak memory (MB)", False),
]
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")  # lm-eval metric names ending so
# a standard benchmark's interval bounds and paired difference (ftq.evaluation.benchmark_scores.flat):
# shown in their own table, not as metrics of their own
INTERVAL_SUFFIXES = ("_low", "_high", "_vs_merged")
GROUPS = {
    "quality": ["task_exact_match", "task_json_valid", "task_json_field_accuracy", "task_rouge_l",
                "task_tool_call_name_accuracy", "task_tool_call_exact", "task_tool_call_abstained", "general_accuracy",
                "pref_accuracy", "pref_logp_accuracy"],
    "lm_eval": [],  # every lm_eval_* metric found in the reports
    "perplexity": ["perplexity"],
    "size": ["size_bytes", "peak_memory_bytes"],
    "speed": ["relative_tokens_per_second", "tokens_per_second", "ttft_seconds_p50", "load_seconds"],
}
ANSWERS_SHOWN = 8
ORDER = ("base", "merged")


def load_reports(root: Path, names: list[str]) -> dict[str, dict]:
    """The evaluations of base, merged and the evaluated builds, in that order."""
    from ftq.layout import eval_dir as report_dir

    missing = [n for n in names if not (root / report_dir(n) / f"{n}.json").exists()]
    if missing:
        raise FileNotFoundError(f"{root / EVAL_ROOT}: no evaluation of {', '.join(missing)}; run `dvc repro` first")
    return {n: json.loads((root / report_dir(n) / f"{n}.json").read_text()) for n in names}


def load_ladder(root: Path) -> dict | None:
    path = root / LADDER
    return json.loads(path.read_text()) if path.exists() else None


def candidates(params: dict[str, Any], ladder: dict | None) -> list[str]:
    """base, merged, and the builds of quantize.enabled that the ladder evaluated (smallest first)."""
    from ftq import schema

    enabled = schema.settings(params, "quantize")["enabled"]
    evaluated = [r["name"] for r in (ladder or {}).get("rungs", []) if r["evaluated"] and r["name"] in enabled]
    return [*ORDER, *evaluated]


def load_answers(root: Path, names: list[str]) -> dict[str, list[dict]]:
    from ftq.layout import eval_dir as report_dir

    answers = {}
    for name in names:
        path = root / report_dir(name) / f"{name}.answers.jsonl"
        answers[name] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return answers


def display(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key in ("size_bytes", "peak_memory_bytes"):
        return f"{value / 1e6:,.1f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def ci(bounds: list[float] | None) -> str:
    return f" [{bounds[0]:.2f}, {bounds[1]:.2f}]" if bounds else ""


def retention(key: str, value: Any, reference: Any) -> str:
    if not isinstance(value, (int, float)) or not isinstance(reference, (int, float)) or not reference:
        return ""
    return f" ({100 * value / reference:.1f}%)"


def spread(value) -> str:
    """A repeated measurement's (max - min) / median."""
    return f" (spread {value:.0%})" if isinstance(value, (int, float)) else ""


def lm_eval_metrics(reports: dict[str, dict]) -> list[tuple[str, str, bool]]:
    """lm-eval's metrics as they appear in the reports: lm_eval_<task>_<metric>."""
    keys = sorted({k for r in reports.values() for k, v in r.items()
                   if k.startswith("lm_eval_") and k != "lm_eval_seconds" and isinstance(v, (int, float))
                   and not k.endswith(INTERVAL_SUFFIXES)})
    return [(k, "lm-eval " + k[len("lm_eval_"):], not k.endswith(LOWER_IS_BETTER)) for k in keys]


def metrics(reports: dict[str, dict]) -> list[tuple[str, str, bool]]:
    split = [k for k, _, _ in METRICS].index("mt_bench_score") + 1  # lm-eval's rows follow the quality rows
    return METRICS[:split] + lm_eval_metrics(reports) + METRICS[split:]


def table_rows(reports: dict[str, dict]) -> list[list[str]]:
    merged = reports.get("merged", {})
    rows = []
    for key, label, _higher in metrics(reports):
        if not any(key in r for r in reports.values()):
            continue
        cells = [display(key, r.get(key)) + ci(r.get(f"{key}_ci95")) + spread(r.get(f"{key}_spread"))
                 + (retention(key, r.get(key), merged.get(key)) if name != "merged" else "")
                 for name, r in reports.items()]
        rows.append([label, *cells])
    rows.append(["MT-Bench", *[r.get("mt_bench_status", "not run") for r in reports.values()]])
    return rows


def benchmark_rows(reports: dict[str, dict]) -> list[list[str]]:
    """One row per candidate and standard benchmark metric: the score over the sampled items with its
    95 % interval, and the paired difference vs merged on the same items (or why the task was skipped)."""
    rows = []
    tasks = sorted({t for r in reports.values() for t in (r.get("benchmarks") or {})})
    for task in tasks:
        for name, report in reports.items():
            section = (report.get("benchmarks") or {}).get(task) or {"status": "not evaluated"}
            if section["status"] != "ok":
                rows.append([task, name, "–", "–", "–", section["status"]])
                continue
            for metric, s in section["metrics"].items():
                vs = s.get("vs_merged")
                rows.append([f"{task} {metric}", name, f"{s['mean']:.4f} [{s['interval'][0]:.4f}, {s['interval'][1]:.4f}]",
                             f"{vs['diff']:+.4f} [{vs['interval'][0]:+.4f}, {vs['interval'][1]:+.4f}]" if vs else "(reference)",
                             f"{section['items']} of {section['of']}", ""])
    return rows


BENCHMARK_HEADER = ["benchmark", "candidate", "score [95 % interval]", "paired difference vs merged [95 %]", "items",
                    "note"]


def chart(reports: dict[str, dict], keys: list[str], title: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in reports.values())]
    if not keys:
        return None
    labels = dict((k, label) for k, label, _ in metrics(reports))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [r.get(key) or 0 for r in reports.values()]
        scale = 1e6 if key.endswith("_bytes") else 1
        ax.bar(list(reports), [v / scale for v in values], color="#4c72b0")
        ax.set_title(labels[key], fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


LADDER_HEADER = ["build", "type", "imatrix", "size MB", "KLD mean", "KLD p99", "top-1", "screen", "walk",
                 "metric vs merged [one-sided bound], p, n", "guard vs merged [one-sided bound], p, n", "outcome"]


def test_cell(test: dict | None) -> str:
    """A non-inferiority test as one cell: the difference, its one-sided lower bound, the p-value, the examples."""
    if not test:
        return "–"
    if test.get("outcome") == "absent":
        return "absent (fails closed)"
    bound = f" [{test['lower']:+.3f}]" if test.get("lower") is not None else ""
    return f"{test['diff']:+.3f}{bound}, p = {test['p_value']:.3g}, n = {test['examples']}"


def ladder_rows(ladder: dict | None) -> list[list[str]]:
    """Every rung of the quantization ladder, smallest first: what the screen measured, its place in the walk,
    its tests (or why it was not tested) and the outcome."""
    rows = []
    order = (ladder or {}).get("walk", {}).get("order") or []
    for r in (ladder or {}).get("rungs", []):
        test = r.get("test") or {}
        outcome = test.get("outcome") or r.get("why") or ("evaluated in full" if r.get("evaluated") else "")
        if r.get("name") == (ladder or {}).get("walk", {}).get("pick"):
            outcome += " (the pick: evaluated in full)"
        elif r.get("evaluated") and test:
            outcome += " (evaluated in full)"
        rows.append([r["name"], str(r.get("type") or r["method"]), "yes" if r.get("imatrix") else "no",
                     f"{r['size_bytes'] / 1e6:,.1f}", f"{r['kld_mean']:.4f}", f"{r['kld_p99']:.3f}",
                     f"{r['top1_agreement']:.3f}", "passed" if r["screen_passed"] else "failed",
                     str(order.index(r["name"]) + 1) if r["name"] in order else "–",
                     test_cell(test.get("metric_test")), test_cell(test.get("general_guard")), outcome])
    return rows


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both size and loss (smaller is better on each)."""
    return [name for name, size, loss in points
            if not any(s <= size and l <= loss and (s, l) != (size, loss) for _, s, l in points)]


def ladder_chart(ladder: dict | None, path: Path) -> Path | None:
    """Size against KL divergence (every rung) and against the metric (evaluated rungs, merged beside),
    the Pareto front of size and KLD joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = (ladder or {}).get("rungs", [])
    if not rungs:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    front = set(pareto_front([(r["name"], r["size_bytes"], r["kld_mean"]) for r in rungs]))
    for r in rungs:
        color = "#4c72b0" if r["screen_passed"] else "#c44e52"
        left.scatter(r["size_bytes"] / 1e6, r["kld_mean"], color=color, marker="o" if r["name"] in front else "x")
        left.annotate(r["name"], (r["size_bytes"] / 1e6, r["kld_mean"]), fontsize=7, xytext=(3, 3),
                      textcoords="offset points")
    on_front = sorted((r["size_bytes"] / 1e6, r["kld_mean"]) for r in rungs if r["name"] in front)
    left.plot([x for x, _ in on_front], [y for _, y in on_front], color="#4c72b0", alpha=0.4)
    left.set(xlabel="size (MB)", ylabel="KL divergence vs merged (mean)", title="screen (red: failed)")
    left.set_yscale("log")
    tested = [r for r in rungs if (r.get("test") or {}).get("metric_test")]
    for r in tested:
        t = r["test"]["metric_test"]
        faithful = r["test"]["outcome"] == "faithful"
        right.errorbar(r["size_bytes"] / 1e6, t["diff"], yerr=[[t["diff"] - t["lower"]], [0]], fmt="o", capsize=3,
                       color="#4c72b0" if faithful else "#dd8452")
        right.annotate(r["name"], (r["size_bytes"] / 1e6, t["diff"]), fontsize=7, xytext=(3, 3),
                       textcoords="offset points")
    if tested:
        margin = ladder.get("margin")
        right.axhline(0, color="grey", linewidth=0.8)
        right.axhline(-margin, color="#c44e52", linestyle="--", label=f"-margin ({margin:g})")
        right.legend(fontsize=7)
    right.set(xlabel="size (MB)", ylabel=f"{ladder.get('metric', 'metric')} - merged",
              title="tested: difference and one-sided bound (blue: faithful)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def ladder_text(ladder: dict) -> str:
    """What the ladder's table shows: the screen, the walk's procedure and order, the margin and the tests."""
    walk = ladder.get("walk") or {}
    guard = ladder.get("general_guard") or {}
    scale = " of merged's score" if ladder.get("margin_scale") == "relative" else ""
    return (f"Every build of quantize.enabled, smallest first: screened by KL divergence and top-1 agreement against "
            f"merged, then tested for non-inferiority against merged on the same examples: {ladder['metric']} "
            f"within a margin of {ladder['margin']:g}{scale} and, where it was, {guard.get('task')} "
            f"{guard.get('metric')} within {guard.get('tolerance')}, each one-sided at {ladder['confidence']:.0%} "
            f"(ftq.evidence). Procedure: {walk.get('procedure')}. Order: {', '.join(walk.get('order') or []) or '–'}; "
            f"stopped at {walk.get('stopped_at') or '– (every build tested was faithful)'}; the pick: "
            f"{walk.get('pick') or 'none'}.")


def markdown(reports, rows, answers, charts, ladder=None) -> str:
    names = list(reports)
    lines = ["# Candidates compared", "",
             "Retention in parentheses is the value as a percentage of `merged`'s.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    benchmarks = benchmark_rows(reports)
    if benchmarks:
        lines += ["", "## Standard benchmarks", "",
                  "lm-eval's own tasks over local files, the same seeded items for every candidate; the paired "
                  "difference is what promote's general-ability guard decides on.", "",
                  "| " + " | ".join(BENCHMARK_HEADER) + " |", "|---" * len(BENCHMARK_HEADER) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in benchmarks]
    rungs = ladder_rows(ladder)
    if rungs:
        lines += ["", "## Quantization ladder", "", ladder_text(ladder), "",
                  "| " + " | ".join(LADDER_HEADER) + " |", "|---" * len(LADDER_HEADER) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rungs]
    lines += [""] + [f"![{c.stem}](compare/{c.name})" for c in charts]
    lines += ["", "## Answers side by side", ""]
    for i, first in enumerate(answers[names[0]][:ANSWERS_SHOWN]):
        lines += [f"### {i + 1}. {first['prompt'][:300]}", "", f"- **reference**: {first['reference'][:300]}"]
        for name in names:
            row = answers[name][i] if i < len(answers[name]) else {}
            lines.append(f"- **{name}**: {str(row.get('answer', '–'))[:300]}")
        lines.append("")
    return "\n".join(lines) + "\n"


def html_page(reports, rows, answers, charts, ladder=None) -> str:
    names = list(reports)
    esc = html.escape
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    images = "".join(
        f'<img alt="{esc(c.stem)}" src="data:image/png;base64,{base64.b64encode(c.read_bytes()).decode()}">' for c in charts
    )
    blocks = []
    for i, first in enumerate(answers[names[0]][:ANSWERS_SHOWN]):
        cells = "".join(
            f"<tr><th>{esc(n)}</th><td><pre>{esc(str((answers[n][i] if i < len(answers[n]) else {}).get('answer', '–')))}</pre></td></tr>"
            for n in names
        )
        blocks.append(f"<h3>{i + 1}. {esc(first['prompt'][:300])}</h3><table><tr><th>reference</th>"
                      f"<td><pre>{esc(first['reference'])}</pre></td></tr>{cells}</table>")
    benchmarks = benchmark_rows(reports)
    standard = ("<h2>Standard benchmarks</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in BENCHMARK_HEADER)
                + "</tr>" + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in benchmarks)
                + "</table>") if benchmarks else ""
    rungs = ladder_rows(ladder)
    standard += ("<h2>Quantization ladder</h2>" + f"<p>{esc(ladder_text(ladder))}</p><table><tr>"
                 + "".join(f"<th>{esc(h)}</th>" for h in LADDER_HEADER)
                 + "</tr>" + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rungs)
                 + "</table>") if rungs else ""
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
             "pre{white-space:pre-wrap;margin:0}img{max-width:100%;margin:4px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ftq: candidates compared</title>"
            f"<style>{style}</style></head><body><h1>Candidates compared</h1>"
            f"<p>Retention in parentheses is the value as a percentage of <code>merged</code>'s.</p>"
            f"<table><tr><th>metric</th>{head}</tr>{body}</table>{standard}{images}<h2>Answers side by side</h2>"
            f"{''.join(blocks)}</body></html>\n")


def run(params: dict[str, Any]) -> dict[str, Any]:
    from ftq.tracking import stage_run

    root = repo_root()
    ladder = load_ladder(root)
    reports = load_reports(root, candidates(params, ladder))
    answers = load_answers(root, list(reports))
    rows = table_rows(reports)
    with stage_run("compare", params, block_values={"candidates": list(reports)}) as tracked:
        groups = {**GROUPS, "lm_eval": [k for k, _, _ in lm_eval_metrics(reports)]}
        charts = [c for group, keys in groups.items()
                  if (c := chart(reports, keys, group, root / CHART_ROOT / f"{group}.png")) is not None]
        pareto = ladder_chart(ladder, root / CHART_ROOT / "ladder.png")
        charts += [pareto] if pareto is not None else []
        atomic_write_text(root / MARKDOWN, markdown(reports, rows, answers, charts, ladder))
        atomic_write_text(root / HTML, html_page(reports, rows, answers, charts, ladder))
        if ladder is not None:
            tracked.log_artifact(root / LADDER)
        for path in (root / MARKDOWN, root / HTML, *charts):
            tracked.log_artifact(path)
    log.info("compared %d candidates -> %s, %s", len(reports), MARKDOWN, HTML)
    return {"candidates": list(reports), "charts": [str(c) for c in charts]}

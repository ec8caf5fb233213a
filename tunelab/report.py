"""One self-contained HTML report of a comparison: a recommendation, tables and charts.

The charts are embedded as base64 PNGs and the style is inline, so the single file can be mailed or archived
without the run folder. Every sentence of the recommendation is computed from the numbers in comparison.json.
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written on headless servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402
import numpy as np  # noqa: E402

from tunelab.io import atomic_write_text  # noqa: E402
from tunelab.rundir import history_losses  # noqa: E402

METRIC_NAMES = {"f1_macro": "macro-F1", "f1_micro": "micro-F1", "r2": "R²", "f1": "entity F1",
                "accuracy": "accuracy", "precision_macro": "macro precision", "recall_macro": "macro recall"}
BASELINE_LABELS = {"linear_probe": "linear probe", "majority": "majority baseline", "mean": "mean baseline"}
BASELINE_COLORS = {"linear_probe": "black", "majority": "grey", "mean": "grey"}
SCRATCH = "scratch"  # the only method that does not start from pretrained weights
STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
         "th:first-child,td:first-child{text-align:left}tr.baseline{color:#666;font-style:italic}img{max-width:100%}")


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


# ---- reading the comparison ---------------------------------------------------------------------------------

def _stat(entry: dict | None, metric: str) -> dict:
    """{"value", "ci", "std"} of one metric; {} when the run or baseline lacks it."""
    return (((entry or {}).get("metrics") or {}).get(metric)) or {}


def _value(entry: dict | None, metric: str) -> float | None:
    return _stat(entry, metric).get("value")


def _ci(entry: dict, metric: str) -> tuple[float, float] | None:
    ci = _stat(entry, metric).get("ci")
    return (ci[0], ci[1]) if ci and None not in ci else None


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def _fractions(c: dict) -> list[float]:
    return sorted(c.get("fractions") or {r["fraction"] for r in c["rows"]} or {1.0})


def _rows_at(c: dict, fraction: float) -> list[dict]:
    """Rows at `fraction` with a main-metric value (a failed run has none and is left out)."""
    return [r for r in c["rows"] if _same(r["fraction"], fraction) and _value(r, c["metric"]) is not None]


def _baselines_at(c: dict, fraction: float) -> dict[str, dict]:
    return {b["name"]: b for b in c.get("baselines") or [] if _same(b["fraction"], fraction)}


def _examples(c: dict, fraction: float) -> int | None:
    return next((r.get("train_examples") for r in c["rows"] if _same(r["fraction"], fraction)), None)


OPTIMISTIC = "*"
OPTIMISTIC_NOTE = ("* chosen on the eval set it is scored on (optimistic): early stopping's best step or the "
                   "threshold; give --test FILE or data.test_split for an untouched estimate")


def optimistic(row: dict) -> bool:
    """A row whose score comes from the same examples that chose its weights or threshold."""
    return bool(row.get("selected_on_eval")) and row.get("graded_on", "eval") == "eval"


def _trainable(row: dict) -> float:
    return math.inf if row.get("trainable") is None else row["trainable"]


# ---- formatting ---------------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    # LoRA can train well under 0.1% of a model's parameters; one decimal would print that as 0.0%.
    return f"{x:.1f}" if abs(x) >= 0.1 or x == 0 else f"{x:.2g}"


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _frac(f: float) -> str:
    return f"{100 * f:g}%"


def _interval(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _score(entry: dict, metric: str, mark: bool = False) -> str:
    """'0.642 [0.611, 0.670]', with '± sd' after the mean when the value is a K-fold mean; with `mark`, a '*'
    after the value of an optimistic row (see OPTIMISTIC_NOTE)."""
    m, ci = _stat(entry, metric), _ci(entry, metric)
    if m.get("value") is None:
        return "-"
    star = OPTIMISTIC if mark and optimistic(entry) else ""
    return (f"{m['value']:.3f}{star}" + (f" ± {m['std']:.3f}" if m.get("std") is not None else "")
            + (f" {_interval(ci)}" if ci else ""))


def _params_phrase(t: int | None, best_t: int | None) -> str:
    if t is None or best_t is None:
        return ""
    return f"{_pct(100 * t / best_t)}% of the trainable parameters" if best_t > 0 else f"{t:,} trainable parameters"


# ---- the recommendation -------------------------------------------------------------------------------------

def recommend(comparison: dict) -> str:
    """One paragraph: the best method, what the others trade, which to pick and why, baselines, transfer."""
    metric = comparison["metric"]
    largest = _fractions(comparison)[-1]
    rows = _rows_at(comparison, largest)
    if not rows:
        return "No run finished with a value for the main metric, so there is nothing to recommend."
    best = max(rows, key=lambda r: _value(r, metric))
    n = _examples(comparison, largest)
    parts = [f"Of the {len(rows)} method{'s' if len(rows) > 1 else ''} trained on {_frac(largest)} of the data"
             + (f" ({n:,} examples)" if n else "")
             + f", {best['method']} scores the highest {metric_name(metric)}: {_score(best, metric)}."]
    others = [r for r in rows if r is not best]
    if others:
        parts.append(f"Compared with {best['method']}: " + "; ".join(_tradeoff(r, best, metric) for r in others) + ".")
    parts.append(_choice(best, rows, metric))
    parts += _baseline_sentences(_baselines_at(comparison, largest), best, rows, metric)
    parts.append(_transfer_sentence(comparison))
    parts.append(_optimism_sentence(rows))
    return " ".join(p for p in parts if p)


def _optimism_sentence(rows: list[dict]) -> str:
    marked = [r["method"] for r in rows if optimistic(r)]
    if not marked:
        return ""
    return (f"The scores of {', '.join(marked)} are optimistic: the eval set they are scored on also chose their "
            "best step or threshold; give --test FILE or data.test_split for an untouched estimate.")


def _tradeoff(row: dict, best: dict, metric: str) -> str:
    """'lora reaches 99.0% of full's macro-F1 with 1.0% of the trainable parameters in 0.62× the time'."""
    v, bv, name = _value(row, metric), _value(best, metric), metric_name(metric)
    if bv > 0 and v >= 0:
        score = f"reaches {_pct(100 * v / bv)}% of {best['method']}'s {name}"
    else:  # R² can be zero or negative, where a ratio means nothing: state the difference instead
        score = f"scores {bv - v:.3f} {name} below {best['method']} ({v:.3f} vs {bv:.3f})"
    params = _params_phrase(row.get("trainable"), best.get("trainable"))
    s, bs = row.get("train_s"), best.get("train_s")
    time = f"in {s / bs:.2f}× the time" if s is not None and bs else ""
    return " ".join(p for p in [row["method"], score, f"with {params}" if params else "", time] if p)


def _choice(best: dict, rows: list[dict], metric: str) -> str:
    """The cheapest method statistically indistinguishable from the best (overlapping 95% CIs), else the best."""
    best_ci, name = _ci(best, metric), best["method"]
    if best_ci is None:
        return (f"Recommendation: {name}, the best scorer, because without confidence intervals the methods "
                "cannot be told apart statistically.")
    # Overlapping intervals is a conservative test of "no detectable difference", which is what matters here.
    tied = [r for r in rows if (ci := _ci(r, metric)) and ci[0] <= best_ci[1] and best_ci[0] <= ci[1]]
    pick = min(tied, key=_trainable)  # `best` is among `tied`, so a cheaper method must earn its place
    if pick is best or _trainable(pick) >= _trainable(best):
        return (f"Recommendation: {name}, because no method with fewer trainable parameters has a 95% CI "
                f"overlapping {name}'s {_interval(best_ci)}.")
    params = _params_phrase(pick.get("trainable"), best.get("trainable"))
    return (f"Recommendation: {pick['method']}, because its 95% CI {_interval(_ci(pick, metric))} overlaps "
            f"{name}'s {_interval(best_ci)}, so the two are statistically indistinguishable here, "
            f"and it is the cheapest such method" + (f", training {params}" if params else "") + ".")


def _baseline_sentences(base: dict[str, dict], best: dict, rows: list[dict], metric: str) -> list[str]:
    name, bv, out = metric_name(metric), _value(best, metric), []
    for key, label in BASELINE_LABELS.items():
        v = _value(base.get(key), metric)
        if v is None:
            continue
        if bv > v:
            out.append(f"{best['method']} beats the {label} ({v:.3f}) by {bv - v:.3f} {name}.")
        else:
            out.append(f"{best['method']} does NOT beat the {label} ({v:.3f}); it is {v - bv:.3f} {name} lower.")
    probe = _value(base.get("linear_probe"), metric)
    below = [r for r in rows if r is not best and probe is not None and _value(r, metric) <= probe]
    if below:
        listed = [f"{r['method']} ({_value(r, metric):.3f})" for r in below]
        listed = " and ".join([", ".join(listed[:-1]), listed[-1]] if len(listed) > 1 else listed)
        out.append(f"{listed} {'does' if len(below) == 1 else 'do'} NOT beat the linear probe ({probe:.3f}), "
                   "a linear model on frozen pretrained features, so that fine-tuning does not pay off here.")
    return out


def _transfer_gap(c: dict, fraction: float) -> tuple[float, str, float] | None:
    """(best pretrained method's metric minus scratch's, that method, the gap's rough 95% half-width)."""
    rows = _rows_at(c, fraction)
    scratch = [r for r in rows if r["method"] == SCRATCH]
    pretrained = [r for r in rows if r["method"] != SCRATCH]
    if not scratch or not pretrained:
        return None
    top = max(pretrained, key=lambda r: _value(r, c["metric"]))
    # Independent eval errors add in quadrature; without intervals we cannot judge noise, so it counts as zero.
    halves = [(ci[1] - ci[0]) / 2 for ci in (_ci(top, c["metric"]), _ci(scratch[0], c["metric"])) if ci]
    half = math.sqrt(sum(h * h for h in halves))
    return _value(top, c["metric"]) - _value(scratch[0], c["metric"]), top["method"], half


def _transfer_sentence(c: dict) -> str:
    fractions = _fractions(c)
    if len(fractions) < 2 or SCRATCH not in c["methods"]:
        return ""
    lo, hi = fractions[0], fractions[-1]
    small, large = _transfer_gap(c, lo), _transfer_gap(c, hi)
    if small is None or large is None:
        return ""
    # The two gaps are themselves noisy: a difference inside their combined interval is no evidence either way.
    noise = math.sqrt(small[2] ** 2 + large[2] ** 2)
    if abs(small[0] - large[0]) <= noise:
        verdict = "Whether transfer matters more when data is small is not settled by this data"
    elif small[0] > large[0]:
        verdict = "Transfer matters most when data is small"
    else:
        verdict = "Transfer does not matter more when data is small"
    return (f"{verdict}: the best pretrained method minus scratch is {small[0]:+.3f} {metric_name(c['metric'])} "
            f"at {_frac(lo)} of the data ({small[1]}) versus {large[0]:+.3f} at {_frac(hi)} ({large[1]})"
            + (f", a difference within the gaps' combined 95% uncertainty (±{noise:.3f})." if abs(small[0] - large[0]) <= noise
               else "."))


# ---- charts -------------------------------------------------------------------------------------------------

def _png(fig, **legend) -> str:
    """The figure as base64 PNG text, closed afterwards (pyplot keeps every open figure alive)."""
    if fig.axes[0].get_legend_handles_labels()[0]:  # an empty legend only draws a warning
        fig.axes[0].legend(**legend)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _colors(c: dict) -> dict[str, str]:
    # One colour per method across every chart, so a reader can follow a method from chart to chart.
    methods = dict.fromkeys([*c["methods"], *(r["method"] for r in c["rows"])])
    return {m: f"C{i % 10}" for i, m in enumerate(methods)}


def _bar_chart(c: dict) -> str:
    metric, largest = c["metric"], _fractions(c)[-1]
    rows, colors = _rows_at(c, largest), _colors(c)
    values = [_value(r, metric) for r in rows]
    cis = [_ci(r, metric) or (v, v) for r, v in zip(rows, values)]
    # Clipped at zero: matplotlib rejects negative error lengths (a CI need not contain its point estimate).
    yerr = np.clip([[v - lo for v, (lo, _) in zip(values, cis)], [hi - v for v, (_, hi) in zip(values, cis)]], 0, None)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([r["method"] for r in rows], values, yerr=yerr, capsize=5, color=[colors.get(r["method"]) for r in rows])
    for key, b in _baselines_at(c, largest).items():
        if _value(b, metric) is not None:
            ax.axhline(_value(b, metric), ls="--", color=BASELINE_COLORS.get(key, "grey"), label=key)
    ax.set_ylabel(metric_name(metric))
    ax.set_title(f"{metric_name(metric)} at {_frac(largest)} of the training data")
    return _png(fig)


def _learning_chart(c: dict) -> str:
    metric, colors = c["metric"], _colors(c)
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in c["methods"]:
        rows = sorted((r for r in c["rows"] if r["method"] == method and _value(r, metric) is not None
                       and r.get("train_examples")), key=lambda r: r["train_examples"])
        if not rows:
            continue
        ax.plot([r["train_examples"] for r in rows], [_value(r, metric) for r in rows], marker="o",
                color=colors[method], label=method)
        band = [(r["train_examples"], *_ci(r, metric)) for r in rows if _ci(r, metric)]
        if band:
            x, lo, hi = zip(*band)
            ax.fill_between(x, lo, hi, color=colors[method], alpha=0.15)
    for key in BASELINE_LABELS:
        pts = [(_examples(c, b["fraction"]), _value(b, metric)) for b in c.get("baselines") or [] if b["name"] == key]
        pts = sorted(p for p in pts if p[0] and p[1] is not None)
        if pts:
            ax.plot(*zip(*pts), ls="--", color=BASELINE_COLORS[key], label=key)
    ax.set_xscale("log")
    # Ticks at the sizes actually trained on, written out: "3,000" reads better than "3 × 10³".
    sizes = sorted({r["train_examples"] for r in c["rows"] if r.get("train_examples")})
    ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("training examples (log scale)")
    ax.set_ylabel(metric_name(metric))
    return _png(fig, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: the curves fill the axis


def _read_loss(paths: list[str]) -> tuple[list[int], list[float]]:
    """(steps, training losses) from the first run folder's history that exists (a fold's, under cross-validation)."""
    path = next((Path(p) for p in paths if Path(p).is_file()), None)
    return history_losses(path) if path else ([], [])


def _loss_chart(c: dict) -> str | None:
    curves = {r["method"]: _read_loss(r.get("history") or []) for r in _rows_at(c, _fractions(c)[-1])}
    curves = {m: sl for m, sl in curves.items() if sl[0]}
    if not curves:
        return None
    colors = _colors(c)
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, (steps, losses) in curves.items():
        k = max(1, len(losses) // 20)  # a light moving average: per-batch loss is too noisy to compare methods
        ax.plot(steps[k - 1:], np.convolve(losses, np.ones(k) / k, mode="valid"), color=colors.get(method),
                label=method)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (moving average)")
    return _png(fig)


# ---- HTML ---------------------------------------------------------------------------------------------------

def _table(headers: list[str], body: list[tuple[str, list]]) -> str:
    """An HTML table; body rows are (css class, cells); every cell is escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join(f'<tr class="{cls}">' + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells) + "</tr>"
                   for cls, cells in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _main_table(c: dict) -> str:
    metric, largest = c["metric"], _fractions(c)[-1]
    others = [m for m in c.get("metrics") or [] if m != metric]
    headers = ["method", f"{metric_name(metric)} [95% CI]", *map(metric_name, others), "train s", "samples/s",
               "trainable params (% of total)", "peak MB", "model MB", "latency ms (1 example)", "throughput /s"]
    body = []
    for r in _rows_at(c, largest):
        body.append(("", [r["method"], _score(r, metric, True), *[_num(_value(r, m)) for m in others],
                          _num(r.get("train_s"), 1), _num(r.get("samples_per_s"), 1), _params_cell(r),
                          _num(r.get("peak_mb"), 0), _num(r.get("model_mb"), 1), _num(r.get("latency_ms"), 2),
                          _num(r.get("throughput"), 1)]))
    for name, b in _baselines_at(c, largest).items():
        body.append(("baseline", [name, _score(b, metric), *[_num(_value(b, m)) for m in others], *["-"] * 7]))
    return _table(headers, body)


def _params_cell(row: dict) -> str:
    t, total = row.get("trainable"), row.get("total_params")
    if t is None:
        return "-"
    return f"{t:,}" + (f" ({_pct(100 * t / total)}%)" if total else "")


def _curve_table(c: dict) -> str:
    metric, fractions = c["metric"], _fractions(c)
    headers = ["method"] + [_frac(f) + (f" ({n:,} ex.)" if (n := _examples(c, f)) else "") for f in fractions]
    entries = [(m, "", [r for r in c["rows"] if r["method"] == m]) for m in c["methods"]]
    entries += [(n, "baseline", [b for b in c.get("baselines") or [] if b["name"] == n])
                for n in dict.fromkeys(b["name"] for b in c.get("baselines") or [])]
    body = [(cls, [name] + [next((_score(e, metric, True) for e in found if _same(e["fraction"], f)), "-")
                            for f in fractions]) for name, cls, found in entries]
    return _table(headers, body)


def _uncertainty(c: dict) -> str:
    k = c.get("folds") or 0
    if c.get("graded_on") == "test":
        with_ci = any(_ci(r, c["metric"]) for r in c["rows"])
        intervals = ("brackets hold 95% bootstrap confidence intervals on it" if with_ci
                     else "without bootstrap there are no confidence intervals, so small gaps may be noise")
        return ("Every value is scored on the test set, which nothing selected on (no early stopping, threshold "
                f"or search looked at it); {intervals}.")
    if k >= 2:
        return (f"{k}-fold cross-validation: each value is the mean over the folds ± its standard deviation, "
                f"with the 95% t-interval over the {k} folds in brackets.")
    if any(_ci(r, c["metric"]) for r in c["rows"]):
        return "A single holdout split: brackets hold 95% bootstrap confidence intervals on the holdout set."
    return "A single holdout split without bootstrap: there are no confidence intervals, so small gaps may be noise."


def _footnote(c: dict) -> str:
    """The line under a table that explains its '*' marks; empty when no row carries one."""
    return f"<p><small>{html.escape(OPTIMISTIC_NOTE)}</small></p>" if any(optimistic(r) for r in c["rows"]) else ""


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _html(c: dict) -> str:
    esc, name = html.escape, metric_name(c["metric"])
    fractions = _fractions(c)
    parts = [f"<h1>tunelab comparison: {esc(str(c['task']))}</h1>",
             f"<p>Task: <b>{esc(str(c['task']))}</b>. Main metric: <b>{esc(name)}</b> (higher is better). "
             f"{esc(_uncertainty(c))}</p>",
             f"<h2>Recommendation</h2><p>{esc(recommend(c))}</p>",
             f"<h2>Results at {esc(_frac(fractions[-1]))} of the training data</h2>", _main_table(c),
             _footnote(c), _img(_bar_chart(c), f"{name} per method")]
    if len(fractions) > 1:
        parts += ["<h2>Learning curves</h2>", _img(_learning_chart(c), "learning curves"), _curve_table(c),
                  _footnote(c)]
    loss = _loss_chart(c)
    if loss:
        parts += ["<h2>Training loss</h2>", _img(loss, "training loss per optimizer step")]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>tunelab report: '
            f"{esc(str(c['task']))}</title><style>{STYLE}</style></head><body>\n" + "\n".join(parts)
            + "\n</body></html>\n")


def write_report(comparison: dict, out: Path) -> Path:
    """Write `out/report.html` atomically (a reader never sees half a report) and return its path."""
    path = Path(out) / "report.html"
    atomic_write_text(path, _html(comparison))
    return path

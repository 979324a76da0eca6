"""The one self-contained page of a `personavec reproduce` run: a section per stage with its settings, its
numbers and intervals, a one-sentence plain reading and its targets, then every target in one table.
Figures are embedded PNGs (the helpers of `report.html` and `report.plots`); nothing is loaded from anywhere."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from ..io import write_text
from ..reproduce.capability import CapabilityResult
from ..reproduce.context import NotRun
from ..reproduce.extraction import ExtractionResult
from ..reproduce.finetuning import FinetuneResult, FinetuneTrait
from ..reproduce.monitoring import MonitorResult
from ..reproduce.records import Interval, Target
from ..reproduce.screening import ScreenResult
from ..reproduce.settings import ReproduceSettings, flatten
from ..reproduce.sharegpt import ShareGPTResult, ShareGPTTrait
from ..reproduce.steering import SteeringResult, SteeringTrait
from .html import _CSS, LAYER_CONVENTION, _img, _kv_table, read_cells
from .plots import metric_vs_coef
from .reproduce_plots import delta_p_histogram, ordering, rise_bars, scatter_panels

TITLES = {"extract": "1. Extraction", "sweep": "2. Steering sweep with controls", "capability": "3. Capability at the "
          "chosen setting", "monitor": "4. Monitoring: projection vs trait", "finetune": "5. Finetuning",
          "screen": "6. Screening", "sharegpt": "7. Real chat logs: what ΔP flags in ShareGPT"}
EXTRA_CSS = ".met{color:#1e7b34;font-weight:600}.missed{color:#b03a2e;font-weight:600}.notrun{color:#7a7f8a}" \
            ".reading{background:#f6f8f1;border-left:3px solid #8bb26a;padding:6px 10px}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    h = "".join(f'<th class="l">{escape(c)}</th>' for c in head)
    body = "".join("<tr>" + "".join(f'<td class="l">{c}</td>' for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _verdict(met: bool | None) -> str:
    if met is None:
        return '<span class="notrun">not tested</span>'
    return '<span class="met">met</span>' if met else '<span class="missed">missed</span>'


def targets_table(targets: Sequence[Target]) -> str:
    if not targets:
        return '<p class="note">No targets for this stage.</p>'
    return _table(["stage", "target", "value", "met / missed", "source"],
                  [[escape(t.stage), escape(t.name), escape(t.value), _verdict(t.met), escape(t.source)]
                   for t in targets])


def _reading(text: str) -> str:
    return f'<p class="reading">{escape(text)}</p>'


def _ci(i: Interval, digits: int = 3) -> str:
    return escape(i.text(digits)) + f" <span class=\"note\">(n = {i.n})</span>"


def _mapped(i: Interval, f: Callable[[float], float], fmt: str, unit: str = "") -> str:
    """`i` with `f` applied to its mean and bounds (an interval on a log scale shown as a ratio, say)."""
    if i.mean is None:
        return "–"
    ci = "" if i.low is None or i.high is None else f" [{f(i.low):{fmt}}, {f(i.high):{fmt}}]"
    return f"{f(i.mean):{fmt}}{unit}{ci} <span class=\"note\">(n = {i.n})</span>"


def _share(i: Interval) -> str:
    """An accuracy (a share, no sign) with its interval."""
    return _mapped(i, float, ".2f")


def extraction_section(res: ExtractionResult) -> str:
    rows = [[escape(v.trait), f"{v.positive_kept}/{v.positive_total}", f"{v.negative_kept}/{v.negative_total}",
             escape(v.judge), f"{v.threshold:g}", f"<code>{escape(v.path)}</code>", escape(v.digest)]
            for v in res.vectors.values()]
    first = next(iter(res.vectors.values()))
    return (_table(["trait", "positive kept", "negative kept", "judge", "threshold", "vector", "digest"], rows)
            + _reading(f"Each vector is the mean activation difference between the rollouts under the trait's "
                       f"positive and negative system prompts that the {first.judge} judge agreed with "
                       f"({first.trait}: {first.positive_kept} of {first.positive_total} positive and "
                       f"{first.negative_kept} of {first.negative_total} negative kept), at every layer."))


def steering_section(res: SteeringResult, folder: Path) -> str:
    parts = []
    for name, t in res.traits.items():
        h = t.heldout
        rows = [[f"<b>{escape(name)}</b> (own)", _ci(h.own)]]
        rows += [[escape(n), _ci(i)] for n, i in h.random.items()]
        rows += [[f"{escape(n)} (other trait, matched norm)", _ci(i)] for n, i in h.others.items()]
        parts.append(f"<h3>{escape(name)}: layer {t.layer}, coefficient ±{t.coef:g}</h3>"
                     f'<p class="note">Chosen on evaluation questions {t.selection_questions} '
                     f"({'rise −c→+c' if t.rule == 'rise' else 'rise over coefficient 0'} there: "
                     f"{t.selection_change:+.3f}); criterion: {escape(t.criterion)}. "
                     f"Reported on questions {t.report_questions}, which the choice never saw.</p>"
                     + _grid_table(t)
                     + _table(["vector at the chosen layer and norm", "held-out rise −c→+c (nats/token) [95% CI]"],
                              rows))
        labels = [f"{name} (own)", *h.random, *h.others]
        ints = [h.own, *h.random.values(), *h.others.values()]
        parts.append(_img(rise_bars(labels, [i.mean or 0.0 for i in ints], [i.low for i in ints],
                                    [i.high for i in ints], title=f"{name}: held-out rise (reference measure)",
                                    ylabel="rise −c→+c (nats/token)"),
                          f"{name} held-out rises", "Held-out rise per vector with its 95% bootstrap interval over "
                          "questions; own vector in red, controls in grey."))
        cells = folder / t.select_dir / "cells.csv"
        if cells.exists():
            _, rows_all = read_cells(cells)
            own = [r for r in rows_all if not r.get("control") and r["layer"] is not None]
            layers = dict.fromkeys(g.layer for g in t.grid)  # rule rise: its one unsteered cell, drawn per layer
            own += [{**r, "layer": layer} for r in rows_all if r["layer"] is None and not r.get("control")
                    for layer in layers]
            png = metric_vs_coef(own, "trait_mean", "reference measure (nats/token)", chosen=(t.layer, t.coef))
            if png is not None:
                parts.append(_img(png, f"{name} sweep", "Selection half: the reference measure against the "
                                  "coefficient, one line per layer (mean ± standard error); the ring is the choice."))
        ratio = "no random rise to compare with" if h.ratio_to_random is None else \
            f"{h.ratio_to_random:.1f} times the largest random direction's"
        other = "" if h.best_other is None else (
            f"; the strongest other trait's vector ({h.best_other}) moved them {h.best_other_rise or 0:+.3f}")
        parts.append(_reading(
            f"On questions the choice never saw, steering with the {name} vector from −{t.coef:g} to +{t.coef:g} at "
            f"layer {t.layer} changed how much likelier the model finds authored {name} answers than non-{name} ones "
            f"by {h.own.text()} nats per token, {ratio}{other}."))
    return "".join(parts)


def _grid_table(t: SteeringTrait) -> str:
    """Rule "rise": every cell the choice saw (empty for rule "sweep", whose cells.csv plot shows them)."""
    rows = [[str(g.layer), f"{g.coef:g}", f"{g.rise:+.3f}", f"{g.ppl_ratio:.2f}", "yes" if g.kept else "no",
             "◉" if (g.layer, g.coef) == (t.layer, t.coef) else ""] for g in t.grid]
    return _table(["layer", "c", "selection rise −c→+c", "perplexity ratio (worse of ±c)", "kept", "chosen"],
                  rows) if rows else ""


def _ratio(i: Interval) -> str:
    """A mean log ratio shown as a ratio with its interval."""
    return _mapped(i, math.exp, ".3f", "×")


def capability_section(res: CapabilityResult) -> str:
    def gmean(xs: Sequence[float]) -> str:
        return f"{math.exp(sum(math.log(x) for x in xs) / len(xs)):.2f}" if xs else "–"

    def lm_eval_part() -> str:
        """The lm-evaluation-harness tasks (capability.lm_eval_tasks): accuracy unsteered and steered at each
        trait's setting with intervals over items and the paired change, or why they were skipped."""
        if not res.lm_eval_tasks:
            return ('<p class="note">No lm-evaluation-harness tasks were asked for (capability.lm_eval_tasks; the '
                    "paper preset runs mmlu).</p>")
        rows = [[escape(name), f"L{t.layer} +{t.coef:g}", escape(task), _share(m.base), _share(m.steered),
                 _ci(m.change, 3)] for name, t in res.traits.items() for task, m in t.lm_eval.items()]
        table = "" if not rows else _table(
            ["trait", "setting", "lm-eval task", "accuracy unsteered [95% CI over items]",
             "steered (every position) [CI]", "change (paired by item) [CI]"], rows)
        note = "" if not rows else (
            '<p class="note">lm-eval scores each choice in a cache-free forward over question and answer that marks '
            "no prompt/response split, so the steered rows add the vector at every position (positions=all), not "
            "only the answer's.</p>")
        skipped = "" if not res.lm_eval_skipped else \
            f'<p class="note">lm-evaluation-harness tasks skipped: {escape(res.lm_eval_skipped)}</p>'
        return table + note + skipped

    rows = []
    for name, t in res.traits.items():
        rows.append([escape(name), f"L{t.layer} +{t.coef:g}", gmean(res.base.perplexity), gmean(t.steered.perplexity),
                     _ratio(t.log_ppl_change), _share(t.quiz_base), _share(t.quiz_steered), _ci(t.quiz_change, 2)])
    first = next(iter(res.traits.values()), None)
    reading = "" if first is None else _reading(
        f"Steering {first.trait} at its chosen setting multiplies the perplexity of neutral text by "
        f"{math.exp(first.log_ppl_change.mean or 0):.2f} and changes quiz accuracy by "
        f"{first.quiz_change.mean or 0:+.2f} (from {first.quiz_base.mean or 0:.2f}).")
    return (_table(["trait", "setting", "perplexity unsteered (geometric mean over texts)", "steered",
                    "ratio [95% CI over texts]", "quiz unsteered [CI]", "quiz steered [CI]",
                    "quiz change (paired) [CI]"], rows) + reading + lm_eval_part())


def monitor_section(res: MonitorResult, folder: Path) -> str:
    parts = []
    for name, t in res.traits.items():
        rows = [["all points", escape(t.r_points.text())], ["level means", escape(t.r_level_means.text())],
                ["within levels", escape(t.r_within_levels.text())],
                ["within questions", escape(t.r_within_questions.text())],
                [f"judge ({escape(t.judge)}) score of the sampled answers, all points", escape(t.r_judge_points.text())]]
        parts.append(f"<h3>{escape(name)}: projection read at layer {t.layer}</h3>"
                     + _table(["Pearson r (projection vs reference measure) [95% Fisher-z CI]", "r"], rows)
                     + f'<p class="note">Highest content-word overlap of a graded prompt with a prompt pair: '
                       f"{t.overlap.jaccard:.2f} (shared: {escape(', '.join(t.overlap.shared) or 'none')}).</p>")
        png = folder / t.run_dir / "monitor.png"
        if png.exists():
            parts.append(_img(png.read_bytes(), f"{name} monitoring scatter", "Last-prompt-token projection "
                              "against the trait measures, one point per prompt × question."))
        within = t.r_within_levels.r
        parts.append(_reading(
            f"Before any answer token, the {name} projection tracks the reference measure with r = "
            f"{t.r_points.text()} over all points, and r = "
            + ("undefined" if within is None else f"{within:+.2f}")
            + " within a prompt level, where which prompt was used can no longer explain it."))
    return "".join(parts)


def finetune_section(res: FinetuneResult) -> str:
    parts = []
    for name, t in res.traits.items():
        rows = [["base", "–", "0", "0", "–", f"{t.base.perplexity:.2f}", f"{t.base.quiz:.2f}"]]
        for s_name in dict.fromkeys(r.set for r in t.runs):  # the settings' order (JSON sorts the dict keys)
            change, runs = t.change[s_name], [r for r in t.runs if r.set == s_name]
            shift = sum(r.shift for r in runs) / len(runs)
            rand = sum(abs(x) for r in runs for x in r.shift_random) / max(1, sum(len(r.shift_random) for r in runs))
            rows.append([escape(s_name), f"{t.dataset_delta_p[s_name]:+.2f}", _ci(change), f"{shift:+.2f}",
                         f"{rand:.2f}", f"{sum(r.perplexity for r in runs) / len(runs):.2f}",
                         f"{sum(r.quiz for r in runs) / len(runs):.2f}"])
        d = t.ii_minus_normal
        parts.append(f"<h3>{escape(name)}: shift read at layer {t.layer}</h3>"
                     + _table(["set", "mean ΔP before training", "reference − base [95% CI over seeds]",
                               "finetuning shift (mean)", "random directions' mean |shift|", "perplexity", "quiz"],
                              rows)
                     + _table(["comparison", "value"],
                              [["II − normal, paired by seed", "–" if d is None else _ci(d)],
                               ["(a) r(shift, trait change) over the finetunes", escape(t.r_shift.text())],
                               ["(b) r(dataset ΔP before training, trait change)", escape(t.r_delta_p.text())]]))
        deltas = [r.reference - t.base.reference for r in t.runs]
        groups = [r.set for r in t.runs]
        png = scatter_panels([("(a) finetuning shift on the vector", [r.shift for r in t.runs], deltas, groups),
                              ("(b) set's mean ΔP before training", [t.dataset_delta_p[r.set] for r in t.runs],
                               deltas, groups)],
                             ylabel="reference measure − base (nats/token)", title=f"{name}: one point per finetune")
        parts.append(_img(png, f"{name} shift and ΔP vs trait change", "Each finetune's trait change against its "
                          "finetuning shift (left) and against its set's mean ΔP computed before training (right)."))
        parts.append(_reading(
            f"Finetuning on the authored {name} sets moved the reference measure by "
            + "; ".join(f"{k} {t.change[k].text()}" for k in dict.fromkeys(r.set for r in t.runs))
            + " nats per token over the base model"
            + ("" if d is None else f", and the II set {d.text()} above the normal set, paired by seed") + "."))
        if t.vaccine:
            parts.append(vaccine_part(name, t))
    if not any(t.vaccine for t in res.traits.values()):
        parts.append('<p class="note">The vaccine comparison (preventative steering, CAFT, the projection penalty '
                     "and inference-time steering on the II set) was not run (finetune.vaccine).</p>")
    return "".join(parts)


VACCINE_LABELS = {"prevent": "preventative steering", "penalty": "projection penalty", "caft": "CAFT (ablation)",
                  "infer": "inference-time steering"}


def vaccine_part(name: str, t: FinetuneTrait) -> str:
    """The vaccine comparison of one trait: each method's choice, removal and capability cost, and a chart."""
    select, report = t.vaccine_questions
    rows = [[escape(VACCINE_LABELS.get(k, k)), escape(m.chosen),
             escape(", ".join(f"{c} {v:+.2f}" for c, v in m.selection.items())), _ci(m.removal, 2),
             _ci(m.ppl_cost, 3), _ci(m.quiz_change, 3),
             _ci(m.control, 2) if m.control else "not run", _ci(m.beyond_control, 2) if m.beyond_control else "–",
             str(len(m.seeds))] for k, m in t.vaccine.items()]
    ms = list(t.vaccine.values())
    chart = _img(rise_bars([VACCINE_LABELS.get(m.method, m.method) for m in ms], [m.removal.mean or 0.0 for m in ms],
                           [m.removal.low for m in ms], [m.removal.high for m in ms],
                           title=f"{name}: share of the II − normal rise removed (held-out half)",
                           ylabel="removal share"),
                 f"{name} vaccine", "Removal share per method at its chosen setting, with its 95% t interval over "
                 "seeds (1 = the II finetune ends where the normal one does; 0 = no effect).")
    best = max(ms, key=lambda m: m.removal.mean if m.removal.mean is not None else float("-inf"))
    return (f"<h4>{escape(name)}: the vaccine comparison on the II set</h4>"
            + _table(["method", "chosen on questions " + escape(str(select)), "removal share per setting (selection)",
                      "removal share, questions " + escape(str(report)) + " [95% CI over seeds]",
                      "perplexity cost vs plain II [95% CI]", "quiz change vs plain II [95% CI]",
                      "control: removal with a random direction of the same norm, same setting [95% CI]",
                      "removal − control's, paired by seed [95% CI]", "seeds"],
                     rows)
            + chart
            + _reading(f"Each method's setting was chosen on questions {select} and is reported on {report}, which "
                       f"the choice never saw. The largest held-out removal was {escape(VACCINE_LABELS.get(best.method, best.method))} "
                       f"({best.removal.text(2)}) at a perplexity cost of {best.ppl_cost.text(3)} over the plain II "
                       "finetune. A removal share above 1 means the method pushed the trait below the normal finetune; "
                       "with few seeds the intervals are wide. The control column runs each method at its chosen setting "
                       "with a random direction in place of the vector: removal the vector does not beat is not the "
                       "trait's direction at work."))


def screen_section(res: ScreenResult) -> str:
    parts = []
    for name, t in res.traits.items():
        rows = [[escape(lv.set), f"{lv.contamination:.0%}", _ci(lv.delta_p, 2)] for lv in t.levels]
        png = ordering([lv.contamination for lv in t.levels], [lv.delta_p.mean or 0.0 for lv in t.levels],
                       [lv.delta_p.low for lv in t.levels], [lv.delta_p.high for lv in t.levels],
                       title=f"{name}: mean ΔP by contamination", xlabel="share of II rows in the set",
                       ylabel="mean ΔP (fast mode)")
        parts.append(f"<h3>{escape(name)}: ΔP (fast mode) at layer {t.layer}</h3>"
                     + _table(["set", "share of II rows screened", "mean ΔP [95% CI over rows]"], rows)
                     + _img(png, f"{name} ΔP ordering", "Mean ΔP of each set against its share of II rows, with "
                            "95% bootstrap intervals over rows.")
                     + f"<p>Sample-level ROC AUC, II rows vs normal rows: <b>{t.auc:.3f}</b> "
                       f"[{t.auc_low:.3f}, {t.auc_high:.3f}] (whole questions resampled).</p>")
        parts.append(_reading(
            f"Before any training, the projection difference ranks a random {name} (II) answer above a random "
            f"normal one {t.auc:.0%} of the time, and the mean ΔP of a set "
            + ("rises" if t.ordered else "does not rise") + " with every step of its share of II rows."))
    return "".join(parts)


def sharegpt_section(res: ShareGPTResult) -> str:
    parts = [f"<p>{res.n_screened} English ShareGPT conversations (first turn + reply, at most {res.max_chars} "
             f"characters: short chats only), {res.n_counted} with replies of at least {res.min_answer_tokens} "
             f"tokens counted. Control: a random direction of each vector's norm at the same layer.</p>"]
    for name, t in res.traits.items():
        png = delta_p_histogram(t.values, [f.delta_p for f in t.top], title=f"{name}, layer {t.layer}")
        cross = ", ".join(f"{escape(o)} {n}" for o, n in t.cross_overlap.items()) or "–"
        parts.append(f"<h3>{escape(name)}: ΔP at layer {t.layer}</h3>" + _img(png, f"{name} ΔP histogram", "ΔP of every counted conversation; the top-flagged "
                                                                 "ones are marked in red under the axis.")
                     + f"<p>mean ΔP {_ci(t.delta_p, 2)}, sd {t.sd:.2f}, 95th percentile {t.p95:.2f}; "
                       f"r(ΔP, reply tokens) {escape(t.r_length.text())}. Of the top {res.top_k}: "
                       f"{t.random_overlap} also in the random direction's top {res.top_k} (chance "
                       f"{t.chance_overlap:.1f}); shared with the other traits' top {res.top_k}: {cross}.</p>")
        rows = [[str(k), f"{f.delta_p:.2f}", escape(f.id), str(f.answer_tokens), escape(f.user), escape(f.assistant)]
                for k, f in enumerate(t.top, 1)]
        parts.append(_table(["rank", "ΔP", "id", "reply tokens", "user (trimmed)", "assistant (trimmed)"], rows))
        parts.append(_reading(
            f"These are the real conversations whose reply projects furthest beyond what the model itself would "
            f"answer along the {name} vector; whether they show the trait is for a reader to judge. "
            + ("The random direction flags mostly other conversations."
               if t.random_overlap <= max(2 * t.chance_overlap, 1) else
               "The random direction flags many of the same ones: the ranking is partly not about the trait.")))
        if t.finetune is not None:
            parts.append(sharegpt_finetune_part(name, t))
    return "".join(parts)


def sharegpt_finetune_part(name: str, t: ShareGPTTrait) -> str:
    """What finetuning on the ΔP groups instilled: each set's change over the base model and the paired gaps."""
    ft = t.finetune
    assert ft is not None
    rows = [[escape(g), str(len(t.groups.get(g, []))), f"{ft.dataset_delta_p[g]:+.2f}", _ci(ft.change[g])]
            for g in ft.change]
    gaps = [["top − random, paired by seed", "–" if t.top_minus_random is None else _ci(t.top_minus_random)],
            ["top − bottom, paired by seed", "–" if t.top_minus_bottom is None else _ci(t.top_minus_bottom)],
            ["r(set's mean ΔP before training, trait change) over the finetunes", escape(ft.r_delta_p.text())]]
    d = t.top_minus_random
    verdict = "–" if d is None or d.mean is None else (
        "above" if d.above_zero else "below" if d.high is not None and d.high < 0 else "not resolved from")
    return (f"<h4>{escape(name)}: finetuning on the ΔP groups (issue 13 (d))</h4>"
            + _table(["set", "conversations", "mean ΔP before training", "reference − base [95% CI over seeds]"], rows)
            + _table(["comparison", "value"], gaps)
            + _reading(f"LoRA finetunes on the real conversations the {name} vector ranks highest, at random and "
                       f"lowest, measured with the reference measure (authored answers none of them contain). The "
                       f"top set's trait after finetuning is {verdict} the random set's (interval over seeds); "
                       "a set's mean ΔP, computed before any training, is the screening prediction."))


def _status(record: Mapping[str, Any]) -> str:
    status = str(record.get("status", "pending"))
    bits = [f"status <b>{escape(status.replace('_', ' '))}</b>"]
    if record.get("seconds") is not None:
        bits.append(f"{record['seconds']:.0f} s")
    if record.get("attempts"):
        bits.append(f"{record['attempts']} attempt(s)")
    text = " · ".join(bits)
    if record.get("reason"):
        text += f"<br>{escape(str(record['reason']))}"
    return f'<p class="meta">{text}</p>'


def render_page(folder: Path, settings: ReproduceSettings, manifest: Mapping[str, Any], results: Mapping[str, Any],
                targets: Sequence[Target]) -> str:
    flat = flatten(settings)
    model = manifest.get("model", {})
    title = f"personavec reproduce — {settings.preset} preset"
    sections = [f"<h1>{escape(title)}</h1>",
                f'<p class="meta">model <b>{escape(str(model.get("id")))}</b> · fingerprint '
                f'<code>{escape(str(model.get("fingerprint")))}</code> · traits {escape(", ".join(settings.traits))} · '
                f"report {escape(datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC'))}</p>",
                f'<p class="note">{escape(LAYER_CONVENTION)} The trait measure is the reference measure: the '
                "likelihood gap (nats per token) between authored answers that express the trait and ones that do "
                "not, written independently of the prompt pairs that build the vector. Per-item values are in "
                "&lt;stage&gt;.json beside this page.</p>",
                "<h2>Targets</h2>" + targets_table(targets)]
    renderers = {"extract": lambda r: extraction_section(r), "sweep": lambda r: steering_section(r, folder),
                 "capability": lambda r: capability_section(r), "monitor": lambda r: monitor_section(r, folder),
                 "finetune": lambda r: finetune_section(r), "screen": lambda r: screen_section(r),
                 "sharegpt": lambda r: sharegpt_section(r)}
    for name, title_ in TITLES.items():
        record = manifest.get("stages", {}).get(name, {})
        stage_settings = {k.partition(".")[2]: v for k, v in flat.items() if k.startswith(f"{name}.")}
        if name == "finetune":
            stage_settings["data"] = settings.data
        body = _status(record)
        result = results.get(name)
        if name in renderers and result is not None and not isinstance(result, NotRun):
            body += renderers[name](result)
        elif isinstance(result, NotRun):
            body += _reading(f"This stage produced no numbers: {result.reason}.")
        body += "<h3>Settings</h3>" + _kv_table(stage_settings)
        body += "<h3>Targets</h3>" + targets_table([t for t in targets if t.stage == name])
        sections.append(f'<section id="{name}"><h2>{escape(title_)}</h2>{body}</section>')
    sections.append("<h2>Run</h2><h3>All settings</h3>" + _kv_table(flat)
                    + ("<h3>Versions</h3>" + _kv_table(manifest["versions"]) if manifest.get("versions") else ""))
    body = "\n".join(sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{_CSS}{EXTRA_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_page(folder: Path, settings: ReproduceSettings, manifest: Mapping[str, Any], results: Mapping[str, Any],
               targets: Sequence[Target]) -> Path:
    """Write folder/report.html atomically and return its path."""
    out = folder / "report.html"
    write_text(out, render_page(folder, settings, manifest, results, targets))
    return out

"""`personavec reproduce`: the smoke preset end to end on the embedded model (in-process, with two one-step
finetunes on 16 authored rows), interrupted once and resumed without redoing finished stages, rerun with
nothing to do, its report and manifest complete; the settings and their one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Cli, assert_user_error

import personavec as pv
from personavec.io import read_jsonl
from personavec.reproduce import STAGES, flatten, preset, reproduce, vaccine, with_overrides
from personavec.reproduce import pipeline as pipeline_mod
from personavec.reproduce.context import Context
from personavec.reproduce.steering import heldout

SECTIONS = ("extract", "sweep", "capability", "monitor", "finetune", "screen", "sharegpt")
#: The authored finetuning sets (in the repository, not in the wheel): the smoke preset trains on 16 rows of each.
DATA = Path(__file__).resolve().parents[1] / "experiments" / "data" / "finetune_authored"


def test_overrides_are_typed_and_checked() -> None:
    s = with_overrides(preset("cpu"), ["sweep.layers=10,14", "sweep.coefs=1.5", "monitor.n_questions=none",
                                       "sweep.selection_controls=true", "traits=evil"])
    assert s.sweep.layers == (10, 14) and s.sweep.coefs == (1.5,) and s.monitor.n_questions is None
    assert s.sweep.selection_controls is True and s.traits == ("evil",)
    assert preset("cpu").sweep.layers == (10, 14, 18, 22)  # the preset itself is untouched
    for bad, needle in (("sweep.nope=1", "unknown setting 'sweep.nope'"), ("sweep.layers=x", "expected int"),
                        ("preset=paper", "'preset' belongs to the preset"),
                        ("requires_judge=false", "'requires_judge' belongs to the preset"), ("seed", "key=value")):
        with pytest.raises(pv.PersonavecError, match=needle):
            with_overrides(preset("smoke"), [bad])
    with pytest.raises(pv.PersonavecError, match="needs a judge"):
        preset("paper").validate()
    with_overrides(preset("paper"), ["judge=openai:gpt-4.1-mini"]).validate()


def test_sweep_rule_is_checked_in_one_line() -> None:
    """The experiment's rule is the default; `personavec sweep`'s is one --set away; anything else is refused."""
    assert preset("cpu").sweep.rule == "rise" and preset("cpu").sweep.ppl_ratio_max == 1.5
    with_overrides(preset("smoke"), ["sweep.rule=sweep"]).validate()
    with pytest.raises(pv.PersonavecError, match=r"^unknown sweep.rule 'bogus'; choose one of rise, sweep$"):
        with_overrides(preset("smoke"), ["sweep.rule=bogus"]).validate()


def test_vaccine_settings_are_checked_in_one_line() -> None:
    with_overrides(preset("smoke"), ["finetune.vaccine="]).validate()  # empty: the comparison is not run
    for bad, needle in (("finetune.vaccine=prevent,bogus", r"^unknown finetune.vaccine method 'bogus'"),
                        ("finetune.sets=normal,I", "keep normal and II in finetune.sets"),
                        ("finetune.vaccine_traits=sycophantic", "'sycophantic', which is not in --traits"),
                        ("screen.sharegpt_finetune_sets=random,bottom", "must include top"),
                        ("screen.sharegpt_finetune_k=-1", "must be 0"),
                        ("capability.lm_eval_limit=0", "lm_eval_limit must be at least 1")):
        with pytest.raises(pv.PersonavecError, match=needle):
            with_overrides(preset("smoke"), [bad]).validate()


def test_vaccine_choice_and_removal() -> None:
    """The (c) rule on hand-made values: removal share against the same seed's normal and II finetunes; the
    largest removal on the selection half among settings within the perplexity cap, else the cheapest."""
    def scored(cond: str, values: list[float], ppl: float, seed: int = 0) -> vaccine.Scored:
        return vaccine.Scored(cond, seed, dict(enumerate(values)), ppl, 0.5)

    normal, plain = scored("plain", [0.0, 0.0, 0.0, 0.0], 10.0), scored("plain", [1.0, 1.0, 2.0, 2.0], 10.0)
    weak, strong = scored("prevent:1", [0.5, 0.5, 1.0, 1.0], 10.2), scored("prevent:2", [0.0, 0.0, 0.0, 0.0], 11.0)
    assert vaccine.removal(weak, normal, plain, [0, 1]) == pytest.approx(0.5)
    assert vaccine.removal(strong, normal, plain, [2, 3]) == pytest.approx(1.0)
    assert vaccine.choose([weak, strong], normal, plain, [0, 1], ppl_cap=1.05) == "prevent:1"  # 11.0 > 10.5
    assert vaccine.choose([weak, strong], normal, plain, [0, 1], ppl_cap=1.2) == "prevent:2"
    assert vaccine.choose([strong, weak], normal, plain, [0, 1], ppl_cap=1.0) == "prevent:1"  # none within: cheapest
    m = vaccine.summarize("prevent", [weak, strong], [weak, scored("prevent:1", [0.2, 0.2, 0.5, 1.5], 10.5, seed=1)],
                          {0: normal, 1: normal}, {0: plain, 1: plain}, [0, 1], [2, 3])
    assert m.chosen == "prevent:1" and m.selection == {"prevent:1": 0.5, "prevent:2": 1.0} and m.seeds == [0, 1]
    assert m.removal.mean == pytest.approx((0.5 + 0.5) / 2) and m.removal.n == 2
    assert m.ppl_cost.mean == pytest.approx((0.02 + 0.05) / 2)
    assert vaccine.conditions("caft", [1.0, 2.0]) == ["caft"] and vaccine.inference_coef("infer:2") == -2.0
    # the control: the chosen setting with a random direction; its removal is reported beside the method's
    ctrl = [scored("random-prevent:1", [1.0, 1.0, 1.8, 1.8], 10.1), scored("random-prevent:1", [0, 0, 2.0, 2.0], 10.0,
                                                                        seed=1)]
    c = vaccine.summarize("prevent", [weak, strong], [weak], {0: normal, 1: normal}, {0: plain, 1: plain}, [0, 1],
                          [2, 3], ctrl)
    assert c.control is not None and c.control.mean == pytest.approx((0.1 + 0.0) / 2) and c.control.n == 2
    assert c.control_ppl_cost is not None and c.control_ppl_cost.mean == pytest.approx(0.005)
    assert c.beyond_control is not None and c.beyond_control.n == 1  # paired by seed: only seed 0 has both
    assert c.beyond_control.mean == pytest.approx(0.5 - 0.1) and c.control_per_seed == pytest.approx([0.1, 0.0])
    assert m.removal_per_seed == pytest.approx([0.5, 0.5]) and m.beyond_control is None
    assert m.control is None and vaccine.control_of("prevent:1") == "random-prevent:1"
    assert vaccine.inference_coef("random-infer:2") == -2.0 and vaccine.inference_coef("random-prevent:1") == 0.0


def test_vaccine_control_swaps_the_direction_only() -> None:
    """A control condition trains (or steers) with a random direction of the vector's norm at the same setting."""
    vec = pv.PersonaVector({"response": torch.randn(31, 64, generator=torch.Generator().manual_seed(1))},
                           {"trait": "evil"})
    iv, ctrl = vaccine.interventions_for("prevent:2", vec, 18), vaccine.interventions_for("random-prevent:2", vec, 18)
    assert iv.preventative is vec and iv.coef == ctrl.coef == 2.0 and ctrl.layer == 18
    assert ctrl.preventative is not None and ctrl.preventative.trait.startswith("random")
    assert torch.allclose(ctrl.preventative.at(18).norm(), vec.at(18).norm())
    assert abs(torch.nn.functional.cosine_similarity(ctrl.preventative.at(18).float(), vec.at(18).float(), dim=0)) < 0.2
    pen = vaccine.interventions_for("random-penalty:1", vec, 18)
    assert pen.penalty == 1.0 and pen.penalty_vector is not None and pen.penalty_vector.trait.startswith("random")
    assert vaccine.interventions_for("random-caft", vec, 18).ablate is not vec
    assert vaccine.direction("infer:1", vec) is vec


def test_heldout_statistics() -> None:
    """Issue 12's two steering tests on hand-made rises: interval above 0 and ≥ 3× random; beats others."""
    h = heldout([1.0, 1.2, 0.8, 1.1], {"random0": [0.1, -0.1, 0.2, 0.0], "random1": [-0.3, -0.2, -0.2, -0.3]},
                {"other": [0.9, 1.3, 1.0, 1.2]})
    assert h.interval_above_zero and h.max_abs_random == pytest.approx(0.25)
    assert h.ratio_to_random == pytest.approx(1.025 / 0.25) and h.beats_random
    assert h.best_other == "other" and h.beats_others is False  # 1.1 > 1.025
    one = heldout([0.1, -0.1, 0.05], {"random0": [0.1, 0.1, 0.1]}, {})
    assert not one.interval_above_zero and not one.beats_random and one.beats_others is None


def test_cli_refuses_bad_settings_in_one_line(cli: Cli, tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    assert_user_error(cli("reproduce", "--preset", "nope", "--out", out, ok=False), "unknown preset 'nope'")
    assert_user_error(cli("reproduce", "--preset", "smoke", "--set", "sweep.bogus=1", "--out", out, ok=False),
                      "unknown setting 'sweep.bogus'")
    assert_user_error(cli("reproduce", "--preset", "paper", "--out", out, ok=False), "needs a judge")
    assert_user_error(cli("reproduce", "--preset", "smoke", ok=False), "--out is required")
    assert_user_error(cli("reproduce", "--preset", "smoke", "--tensor-parallel-size", "2", "--out", out, ok=False),
                      "--tensor-parallel-size applies to the vllm engine")
    assert not Path(out).exists()
    shown = cli("reproduce", "--show-preset", "paper", "--set", "sweep.coefs=0.5,2.5")
    keys = [line.split(" = ")[0] for line in shown.stdout.splitlines()]
    assert keys == list(flatten(preset("paper")))
    assert "sweep.coefs = 0.5,2.5" in shown.stdout and "finetune.lr = 1e-05" in shown.stdout


@pytest.mark.slow
def test_smoke_runs_resumes_and_reports(model: pv.Model, cli: Cli, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "smoke"
    if not (DATA / "evil" / "II.jsonl").is_file():
        pytest.skip("the authored finetuning sets are not in this checkout")
    settings = with_overrides(preset("smoke"), [f"data={DATA}"])
    real_monitor = STAGES["monitor"]
    calls = {"monitor": 0}

    def interrupted_once(ctx: Context) -> Any:
        calls["monitor"] += 1
        if calls["monitor"] == 1:
            raise RuntimeError("interrupted on purpose")
        return real_monitor(ctx)

    monkeypatch.setitem(pipeline_mod.STAGES, "monitor", interrupted_once)
    with pytest.raises(RuntimeError, match="on purpose"):
        reproduce(model, settings, out)
    first = json.loads((out / "manifest.json").read_text())["stages"]
    assert [first[s]["status"] for s in SECTIONS] == ["done", "done", "done", "failed"] + ["pending"] * 3
    assert "interrupted on purpose" in first["monitor"]["reason"]

    resumed = reproduce(model, settings, out)  # the monitor stage runs again; nothing before it does
    assert resumed.ran == ["monitor", "finetune", "screen", "sharegpt"] and calls["monitor"] == 2
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    for name in ("extract", "sweep", "capability"):
        assert stages[name] == first[name]  # same attempt count and timings: not redone
    assert stages["monitor"]["status"] == "done" and stages["monitor"]["attempts"] == 2
    assert stages["finetune"]["status"] == "done"
    assert stages["screen"]["status"] == "done" and stages["sharegpt"]["status"] == "done"

    # per-item values beside the report, consistent with the library's own run folders
    sweep = json.loads((out / "sweep.json").read_text())["traits"]["evil"]
    assert len(sweep["rises"]["own"]) == settings.sweep.n_report == len(sweep["report_questions"])
    assert set(sweep["report_questions"]).isdisjoint(sweep["selection_questions"])
    rows = read_jsonl(out / sweep["report_dir"] / "measure.jsonl")
    cell = {(r["cell"], r["question_idx"]): r["value"] for r in rows}
    c, layer = sweep["coef"], sweep["layer"]
    own = [cell[(f"L{layer}_c{c:+g}", q)] - cell[(f"L{layer}_c{-c:+g}", q)] for q in sweep["report_questions"]]
    assert sweep["heldout"]["own"]["mean"] == pytest.approx(sum(own) / len(own))
    assert set(sweep["rises"]) == {"own", "random0"}
    # the default rule (the experiment's): the grid it chose from, one cell in the smoke preset, largest kept rise
    assert sweep["rule"] == "rise" and "rise" in sweep["criterion"]
    grid = sweep["grid"]
    assert [(g["layer"], g["coef"]) for g in grid] == [(*settings.sweep.layers, *settings.sweep.coefs)]
    best = max((g for g in grid if g["kept"]), key=lambda g: g["rise"])
    assert (best["layer"], best["coef"]) == (layer, c) and sweep["selection_change"] == pytest.approx(best["rise"])
    assert all(g["kept"] == (g["ppl_ratio"] <= settings.sweep.ppl_ratio_max) for g in grid)
    sel = {(r["cell"], r["question_idx"]): r["value"] for r in read_jsonl(out / sweep["select_dir"] / "measure.jsonl")}
    sel_rise = [sel[(f"L{layer}_c{c:+g}", q)] - sel[(f"L{layer}_c{-c:+g}", q)] for q in sweep["selection_questions"]]
    assert grid[0]["rise"] == pytest.approx(sum(sel_rise) / len(sel_rise))
    ppl = {r["key"]: r["perplexity"] for r in read_jsonl(out / sweep["select_dir"] / "perplexity.jsonl")}
    assert set(ppl) == {"base", f"L{layer}_c{c:+g}", f"L{layer}_c{-c:+g}"}
    assert grid[0]["ppl_ratio"] == pytest.approx(max(ppl[f"L{layer}_c{c:+g}"], ppl[f"L{layer}_c{-c:+g}"]) / ppl["base"])
    cap = json.loads((out / "capability.json").read_text())
    assert len(cap["base"]["perplexity"]) == settings.capability.n_texts
    assert len(cap["base"]["quiz"]) == settings.capability.n_quiz
    mon = json.loads((out / "monitor.json").read_text())["traits"]["evil"]
    assert len(mon["points"]) == 8 * (settings.monitor.n_questions or 0)  # 8 graded prompts × questions
    assert mon["layer"] == layer
    ft = json.loads((out / "finetune.json").read_text())["traits"]["evil"]
    assert [(r["set"], r["seed"]) for r in ft["runs"]] == [("normal", 0), ("II", 0)]
    assert ft["base"]["shift"] == 0 and all(r["shift"] != 0 for r in ft["runs"])  # training moved the model
    assert all(len(r["reference_per_question"]) == settings.finetune.n_questions for r in ft["runs"])
    assert set(ft["dataset_delta_p"]) == {"normal", "II"}
    # the vaccine on the II set: one trained and one inference-time method, replayable from the per-item values
    vac, (select, report) = ft["vaccine"], ft["vaccine_questions"]
    assert set(vac) == {"infer", "prevent"} and select and report and set(select).isdisjoint(report)
    runs = {(r["condition"], r["seed"]): r for r in ft["vaccine_runs"]}
    assert set(runs) == {("infer:1", 0), ("prevent:1", 0), ("random-infer:1", 0), ("random-prevent:1", 0)}
    normal, plain = ({q: g for q, g in zip(r["questions"], r["reference_per_question"], strict=True)}
                     for r in ft["runs"])

    def half(per_q: dict[int, float]) -> float:
        return sum(per_q[q] for q in report) / len(report)

    for method, cond in (("infer", "infer:1"), ("prevent", "prevent:1")):
        r = runs[(cond, 0)]
        got = dict(zip(r["questions"], r["reference_per_question"], strict=True))
        assert vac[method]["chosen"] == cond
        assert vac[method]["removal"]["mean"] == pytest.approx(1 - (half(got) - half(normal)) / (half(plain) - half(normal)))
        assert vac[method]["ppl_cost"]["mean"] == pytest.approx(r["perplexity"] / ft["runs"][1]["perplexity"] - 1)
        # the control: the same setting with a random direction in the vector's place, scored the same way
        c = runs[(f"random-{cond}", 0)]
        got = dict(zip(c["questions"], c["reference_per_question"], strict=True))
        assert vac[method]["control"]["mean"] == pytest.approx(1 - (half(got) - half(normal)) / (half(plain) - half(normal)))
        assert vac[method]["beyond_control"]["mean"] == pytest.approx(vac[method]["removal"]["mean"]
                                                                      - vac[method]["control"]["mean"])
        assert c["reference"] != r["reference"]
    # inference-time steering measures the plain II adapter, steered (the shift, a property of the weights, is
    # read unsteered); preventative steering trained another adapter
    assert runs[("infer:1", 0)]["shift"] == pytest.approx(ft["runs"][1]["shift"], abs=1e-4)
    assert runs[("infer:1", 0)]["reference"] != ft["runs"][1]["reference"]
    assert runs[("prevent:1", 0)]["shift"] != pytest.approx(ft["runs"][1]["shift"], abs=1e-4)
    sc = json.loads((out / "screen.json").read_text())["traits"]["evil"]
    shares = {lv["set"]: lv["contamination"] for lv in sc["levels"]}
    assert shares["normal"] == 0 and shares["II"] == 1 and list(shares.values()) == sorted(shares.values())
    assert all(len(lv["values"]) == settings.finetune.max_rows for lv in sc["levels"])
    normal_dp = next(lv["values"] for lv in sc["levels"] if lv["set"] == "normal")
    ii_dp = next(lv["values"] for lv in sc["levels"] if lv["set"] == "II")
    assert sc["auc"] == pytest.approx(sum((a > b) + 0.5 * (a == b) for a in ii_dp for b in normal_dp)
                                      / (len(ii_dp) * len(normal_dp)))
    share = json.loads((out / "sharegpt.json").read_text())
    sg = share["traits"]["evil"]
    assert share["n_screened"] == settings.screen.sharegpt_n and len(sg["values"]) == len(share["ids"])
    assert [f["delta_p"] for f in sg["top"]] == sorted(sg["values"], reverse=True)[: settings.screen.sharegpt_top]
    assert all(f["answer_tokens"] >= settings.screen.min_answer_tokens and f["assistant"] for f in sg["top"])
    assert 0 <= sg["random_overlap"] <= share["top_k"] and sg["layer"] == layer
    # (d) wired end to end: finetunes on the top and random K by ΔP, each set's mean ΔP from the screen's values
    k = settings.screen.sharegpt_finetune_k
    order = sorted(range(len(sg["values"])), key=lambda i: -sg["values"][i])
    assert sg["groups"]["top"] == [share["ids"][i] for i in order[:k]] and len(sg["groups"]["random"]) == k
    sft = sg["finetune"]
    assert [(r["set"], r["seed"]) for r in sft["runs"]] == [("top", 0), ("random", 0)]
    assert sft["dataset_delta_p"]["top"] == pytest.approx(sum(sg["values"][i] for i in order[:k]) / k)
    assert sg["top_minus_random"]["mean"] == pytest.approx(sft["runs"][0]["reference"] - sft["runs"][1]["reference"])
    assert sg["top_minus_bottom"] is None
    assert sft["base"] == ft["base"]  # the base model is measured once, by the finetune stage, and reused

    page = (out / "report.html").read_text()
    for name in SECTIONS:
        assert f'<section id="{name}">' in page
    assert page.count("<h3>Targets</h3>") == len(SECTIONS) and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page  # self-contained
    for figure in ("held-out rises", "monitoring scatter", "shift and ΔP vs trait change", "vaccine", "ΔP ordering",
                   "ΔP histogram"):  # the paper's figure types
        assert f'alt="evil {figure}"' in page
    targets = json.loads((out / "targets.json").read_text())
    assert {t["stage"] for t in targets} == {"sweep", "capability", "monitor", "finetune", "screen", "sharegpt"}
    assert [isinstance(t["met"], bool) for t in targets if "(c)" in t["name"] or "(d)" in t["name"]] == [True, True]
    assert all(isinstance(t["met"], bool) for t in targets if t["stage"] in ("sweep", "capability"))
    # (a) and (b) over two datasets are no test (r only orders II above normal): not tested, and it says why
    ab = [t for t in targets if t["stage"] == "finetune" and ("(a)" in t["name"] or "(b)" in t["name"])]
    assert len(ab) == 2 and all(t["met"] is None and "not a test" in t["value"] for t in ab)

    # the command line on the finished folder: nothing to redo; other settings are refused, not mixed
    monkeypatch.setitem(pipeline_mod.STAGES, "monitor", real_monitor)
    res = cli("reproduce", "--preset", "smoke", "--data", str(DATA), "--out", str(out), "--json")
    assert json.loads(res.stdout)["ran"] == []
    assert json.loads((out / "manifest.json").read_text())["stages"] == stages
    assert_user_error(cli("reproduce", "--preset", "smoke", "--data", str(DATA), "--set", "sweep.n_report=4",
                          "--out", str(out), ok=False), "belongs to another reproduce")

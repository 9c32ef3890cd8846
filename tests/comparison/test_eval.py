"""`pixfleet eval`: figures with their intervals, the promotion rule, and the registry's alias
moved (or not) by the numbers."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from pixfleet.comparison.report import decide
from pixfleet.config.evaluation import EvalJobConfig, PromotionConfig
from pixfleet.evaluation.statistics import Figure, bootstrap_mean, paired_difference
from pixfleet.models.tiny import make_tiny_inception
from tests.helpers import CHROMIUM, PROJECT, register_controlnet, rendered_dom, tiny_spec, tracking_uri

pytestmark = pytest.mark.timeout(300)
RNG = np.random.default_rng(3)


def test_a_bootstrap_interval_holds_the_mean_and_narrows_with_more_images():
    small, large = RNG.normal(0.5, 0.1, 25), RNG.normal(0.5, 0.1, 2500)
    figures = [bootstrap_mean(values, 1000) for values in (small, large)]
    for figure, values in zip(figures, (small, large), strict=True):
        assert figure.low < figure.mean < figure.high and figure.count == len(values)
        assert figure.mean == pytest.approx(values.mean())
        # the percentile interval of the mean: about 1.96 standard errors either side
        assert figure.high - figure.low == pytest.approx(2 * 1.96 * values.std() / np.sqrt(len(values)), rel=0.2)
    assert figures[1].high - figures[1].low < (figures[0].high - figures[0].low) / 5
    assert bootstrap_mean(np.full(10, 0.3), 200) == bootstrap_mean(np.full(10, 0.3), 200)  # seeded, exact


def test_a_paired_difference_cancels_what_the_rows_share():
    index = pd.Index(range(50))
    hardness = pd.Series(RNG.normal(0, 1, 50), index)  # rows hard or easy for every model
    champion, challenger = hardness, hardness + 0.05 + pd.Series(RNG.normal(0, 0.01, 50), index)
    difference = paired_difference(challenger, champion.drop(index=[0, 1]), 1000)
    assert difference.count == 48 and 0.04 < difference.low < difference.high < 0.06
    unpaired = bootstrap_mean(challenger.to_numpy(), 1000)
    assert unpaired.high - unpaired.low > 10 * (difference.high - difference.low)


def _frames(champion_f1, challenger_f1, champion_clip=None, challenger_clip=None):
    def frame(f1, clip):
        columns = {"control_0.edge_f1": f1}
        if clip is not None:
            columns["clip_score"] = clip
        return pd.DataFrame(columns)

    return frame(champion_f1, champion_clip), frame(challenger_f1, challenger_clip)


BASE = RNG.uniform(0.2, 0.4, 200)


@pytest.mark.parametrize(
    ("challenger", "rule", "promoted", "reason"),
    [
        (BASE + 0.05, {}, True, r"control_0.edge_f1 improves by 0.05"),
        (BASE - 0.05, {}, False, r"worse than the champion's"),
        (BASE + RNG.normal(0, 0.05, 200), {}, False, r"within the noise \(its 95% interval holds 0\)"),
        (BASE + 0.05, {"min_absolute_change": 0.1}, False, r"under min_absolute_change 0.1"),
        (BASE + 0.05, {"min_relative_change": 0.5}, False, r"under min_relative_change 0.5"),
        (BASE + 0.05, {"threshold": 0.9}, False, r"does not reach the threshold 0.9"),
    ],
)
def test_the_primary_metric_decides_by_its_rule_and_beyond_the_noise(challenger, rule, promoted, reason):
    champion, challenger = _frames(BASE, challenger)
    decision = decide(PromotionConfig(primary="control_0.edge_f1", rule=rule), champion, challenger, 1000)
    assert decision.promote is promoted
    assert re.search(reason, decision.reason), decision.reason


def test_a_guard_that_worsens_past_its_tolerance_refuses_the_better_primary():
    # ControlNet++'s own case: controllability up, CLIP score down.
    clip = RNG.uniform(30, 33, 200)
    champion, challenger = _frames(BASE, BASE + 0.05, clip, clip - 0.28)
    guarded = PromotionConfig(primary="control_0.edge_f1", guards={"clip_score": {"max_absolute_worsening": 0.1}})
    assert decide(guarded, champion, challenger, 1000).reason == "guard clip_score worsens by 0.28 (tolerance 0.1)"
    tolerant = PromotionConfig(primary="control_0.edge_f1", guards={"clip_score": {"max_absolute_worsening": 0.5}})
    assert decide(tolerant, champion, challenger, 1000).promote
    # depth RMSE is better lower: a challenger with a lower RMSE wins
    champion, challenger = (
        pd.DataFrame({"control_0.depth_rmse": BASE}),
        pd.DataFrame({"control_0.depth_rmse": BASE - 0.05}),
    )
    assert decide(PromotionConfig(primary="control_0.depth_rmse"), champion, challenger, 1000).promote


def test_fid_guards_as_a_figure_of_the_whole_set():
    champion, challenger = _frames(BASE, BASE + 0.05)
    promotion = PromotionConfig(primary="control_0.edge_f1", guards={"fid": {"max_relative_worsening": 0.1}})
    fid = {"champion": Figure(14.73, 14.0, 15.5, 200), "challenger": Figure(18.23, 17.4, 19.1, 200)}  # ControlNet++'s
    assert decide(promotion, champion, challenger, 1000, fid).reason == (
        "guard fid worsens by 3.5: 14.73 -> 18.23 (tolerance 1.473)"
    )
    fid["challenger"] = Figure(15.5, 14.8, 16.3, 200)
    assert decide(promotion, champion, challenger, 1000, fid).promote


def test_fid_settings_that_cannot_work_are_refused(tmp_path):
    base = {
        "models": [{"name": "champion", "model": {"task": "controlnet", "base_model": "a/b", "controlnets": ["c/d"]}}],
        "source": {"path": str(tmp_path)},
        "evaluate": {"control": [{"detector": "canny"}]},
    }
    with pytest.raises(ValueError, match=r"no such file. FID needs clean-fid's Inception features, inception-2015"):
        EvalJobConfig.model_validate(base | {"fid": {"inception": str(tmp_path / "nope.pt")}})
    with pytest.raises(ValueError, match=r"promotion.primary: FID is a figure of the whole set"):
        EvalJobConfig.model_validate(
            base | {"promotion": {"champion": "champion", "challenger": "champion", "primary": "fid"}}
        )
    with pytest.raises(ValueError, match=r"promotion.guards.fid: set fid.inception"):
        promotion = {"champion": "champion", "challenger": "champion", "primary": "clip_score", "guards": {"fid": {}}}
        EvalJobConfig.model_validate(base | {"promotion": promotion})


def _diverged(tiny_dir, out):
    """The tiny ControlNet as a fine-tune that diverged: NaN weights, so every image comes out
    black (diffusers turns NaN into 0) and follows no edge: canny F1 0 on every row."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(tiny_dir / "controlnet" / "controlnet")
    with torch.no_grad():
        controlnet.controlnet_mid_block.weight.fill_(float("nan"))
    controlnet.save_pretrained(out)
    return out


@pytest.mark.usefixtures("ray_session")
def test_eval_promotes_the_better_challenger_recording_why(tiny_dir, fill50k_dir, tmp_path):
    import mlflow

    from pixfleet.comparison.job import run_eval

    registry = tracking_uri(tmp_path)
    healthy, diverged = tiny_dir / "controlnet" / "controlnet", _diverged(tiny_dir, tmp_path / "diverged")
    register_controlnet(diverged, "canny", registry, tmp_path / "artifacts", alias="champion")  # v1
    register_controlnet(healthy, "canny", registry, tmp_path / "artifacts", alias="challenger")  # v2
    spec = tiny_spec(tiny_dir, "controlnet").model_dump()
    inception = make_tiny_inception(tmp_path / "inception-2015-12-05.pt")

    def eval_job(name):
        models = [
            {"name": role, "model": spec | {"controlnets": [f"models:/canny@{role}"]}}
            for role in ("champion", "challenger")
        ]
        return EvalJobConfig.model_validate(
            {
                "name": name,
                "models": models,
                "source": {"path": str(fill50k_dir), "limit": 8},
                "preprocess": {"width": 64, "height": 64},  # at 32 px the tiny model's images have few edges
                "params": {"num_inference_steps": 4},
                "evaluate": {"control": [{"detector": "canny"}]},
                "sink": {"output_dir": str(tmp_path / name)},
                "resources": {"batch_size": 8},
                "tracking": {"tracking_uri": registry, "experiment": "eval"},
                "promotion": {"primary": "control_0.edge_f1"},
                "fid": {"inception": str(inception), "bootstrap_samples": 20},
            }
        )

    client = mlflow.MlflowClient(registry)
    first = run_eval(eval_job("first"), promote="champion")  # the refusal: apply_decision below

    assert first.report.decision.promote and first.promoted == "canny/2 is now champion"
    assert int(client.get_model_version_by_alias("canny", "champion").version) == 2
    figures = first.report.figures
    assert figures["champion"]["control_0.edge_f1"].mean == 0.0 < figures["challenger"]["control_0.edge_f1"].low
    assert figures["challenger"]["control_0.edge_f1"].count == 8
    assert figures["champion"]["fid"].count == figures["challenger"]["fid"].count == 8  # against the 16 targets
    assert figures["champion"]["fid"].mean != figures["challenger"]["fid"].mean
    tags = client.get_model_version("canny", "2").tags
    assert tags["pixfleet.eval.decision"] == "promoted" and tags["pixfleet.eval.run_id"] == first.mlflow_run_id
    assert "control_0.edge_f1" in (tmp_path / "first" / "comparison.md").read_text()
    side_by_side = (tmp_path / "first" / "comparison.html").read_text()
    for role in ("champion", "challenger"):  # every input's output of each model, with its scores
        assert len(re.findall(rf'src="{role}/images/\w+\.png"', side_by_side)) == 8
    assert side_by_side.count("edge_f1 ") == 16
    if CHROMIUM:
        dom = rendered_dom(tmp_path / "first" / "comparison.html")
        assert re.search(r'data-images-broken="(\d+)"', dom).group(1) == "0"
    children = mlflow.search_runs(
        experiment_names=["eval"], filter_string=f"tags.mlflow.parentRunId = '{first.mlflow_run_id}'"
    )
    assert sorted(children["tags.mlflow.runName"]) == ["first/challenger", "first/champion"]


def test_a_refused_challenger_is_tagged_with_why_and_the_alias_stays(tiny_dir, tmp_path):
    """What `run_eval --promote` does with a decision to refuse (the run above promotes): the
    challenger's version and the eval's run say why, and the alias stays where it was."""
    import mlflow

    from pixfleet.comparison.job import apply_decision
    from pixfleet.comparison.report import Report

    registry = tracking_uri(tmp_path)
    controlnet = tiny_dir / "controlnet" / "controlnet"
    for alias in ("champion", "challenger"):  # v1, v2
        register_controlnet(controlnet, "canny", registry, tmp_path / "artifacts", alias=alias)
    champion, challenger = _frames(BASE, BASE - 0.05)
    decision = decide(PromotionConfig(primary="control_0.edge_f1"), champion, challenger, 1000)
    f1 = bootstrap_mean(challenger["control_0.edge_f1"].to_numpy(), 1000)
    report = Report("champion", {"challenger": {"control_0.edge_f1": f1}}, {}, decision)

    mlflow.set_tracking_uri(registry)
    with mlflow.start_run() as run:
        moved = apply_decision(report, "challenger", ("canny", "2"), "champion", registry, run.info.run_id, mlflow)

    client = mlflow.MlflowClient(registry)
    assert moved is None and int(client.get_model_version_by_alias("canny", "champion").version) == 1
    tags = client.get_model_version("canny", "2").tags
    assert tags["pixfleet.eval.decision"] == "refused" and tags["pixfleet.eval.run_id"] == run.info.run_id
    assert "worse than the champion's" in tags["pixfleet.eval.reason"]
    assert tags["pixfleet.eval.control_0.edge_f1"] == str(f1)
    assert mlflow.get_run(run.info.run_id).data.tags["pixfleet.eval.decision"] == "refused"


def test_the_eval_job_entrypoint_takes_promote_as_the_command_does(tmp_path):
    """`pixfleet submit eval CONFIG --promote ALIAS` runs `python jobs/eval.py --promote ALIAS`
    on the cluster: the option reaches run_eval (which refuses it here, before any work, as the
    config has no promotion section)."""
    import subprocess
    import sys

    import yaml

    config = tmp_path / "eval.yaml"
    model = {"task": "controlnet", "base_model": "a/b", "controlnets": ["c/d"]}
    config.write_text(
        yaml.safe_dump(
            {
                "models": [{"name": "champion", "model": model}],
                "source": {"path": str(tmp_path)},
                "evaluate": {"control": [{"detector": "canny"}]},
                "sink": {"output_dir": str(tmp_path / "out")},
            }
        )
    )
    command = [sys.executable, "jobs/eval.py", str(config), "--promote", "champion"]
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --promote needs a promotion section (primary metric, rule, guards) in the config"
    )
    assert not (tmp_path / "out").exists()

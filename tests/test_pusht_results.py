"""pusht_results with several training seeds: pooled rows, per-seed values, the rollout robustness table, the
analysis mean over seeds and the fine-tuning cost, from small synthetic eval reports (no env, no training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fm_policy.eval.benchmarks import pusht_results as pr
from fm_policy.eval.metrics import mean_ci, rate_ci

SHOVE = {"obs_noise": 0.0, "obs_noise_keys": None, "obs_noise_scale": {}, "shove_step": 100, "shove_block": 40.0,
         "shove_agent": 0.0, "shove_angle": 0.0, "init_noise_scale": 1.0, "init_noise_offset": 0.0, "seed": 0}


def _report(scores: dict[int, list[float]], p50: float = 1.0, disturbance: dict[str, Any] | None = None) -> dict:
    """An `EvalReport.to_dict()`-shaped report: {num_steps: episode scores}; success = score >= 1."""
    steps = list(scores)
    n = len(scores[steps[0]])
    seeds = list(range(100000, 100000 + n))
    settings = []
    for ns, values in scores.items():
        episodes = [{"num_steps": ns, "seed": seed, "max_reward": v, "total_reward": 100 * v, "success": v >= 1.0,
                     "final_coverage": 0.9 * v, "steps": 300, "n_chunks": 38, "terminated": v >= 1.0,
                     "truncated": v < 1.0, "wall_s": 1.0, "video": None,
                     "shove": None if disturbance is None else {"step": 100, "applied": True}}
                    for seed, v in zip(seeds, values)]
        score, success = mean_ci(values), rate_ci([v >= 1.0 for v in values])
        settings.append({
            "num_steps": ns, "label": f"steps-{ns}", "n_episodes": n, "score": score.to_dict(),
            "success": success.to_dict(), "mean_final_coverage": 0.5, "mean_steps": 300.0, "env_steps": 300 * n,
            "wall_s": 1.0, "env_steps_per_s": 300.0, "policy_s": 0.1, "env_s": 0.9,
            "timing": {"n_calls": 38, "mean_ms": 10 * p50, "p50_ms": 10 * p50, "p99_ms": 20 * p50,
                       "per_env_mean_ms": p50 * ns, "per_env_p50_ms": p50 * ns, "per_env_p99_ms": 2 * p50 * ns,
                       "mean_batch": 10.0, "total_s": 0.4},
            "episodes": episodes, "metrics": {},
        })
    env_info = {"env": "pusht", "env_kwargs": {"obs_mode": "keypoints"}, "n_episodes": n, "seed_start": 100000,
                "seeds": seeds, "num_steps": steps, "n_envs": n, "workers": 1, "max_episode_steps": 300,
                "torch_seed": 0, "disturbance": disturbance, "policy": "FlowPolicy",
                "hardware": {"cpu": "AMD EPYC", "device": "cpu"}}
    return {"settings": settings, "env_info": env_info}


SEEDS = [  # three training seeds, four test episodes each, at 1 and 8 sampler steps
    {1: [0.5, 1.0, 0.7, 1.0], 8: [1.0, 1.0, 0.9, 1.0]},
    {1: [0.6, 0.4, 1.0, 0.8], 8: [1.0, 0.8, 1.0, 0.7]},
    {1: [0.2, 0.3, 0.5, 1.0], 8: [0.9, 1.0, 1.0, 1.0]},
]


def _write(tmp_path: Path, name: str, report: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return str(path)


@pytest.fixture
def seed_reports(tmp_path: Path) -> list[str]:
    return [_write(tmp_path, f"eval_s{i}.json", _report(s, p50=1.0 + i)) for i, s in enumerate(SEEDS)]


def test_multi_seed_rows_pool_episodes_and_keep_each_seed(seed_reports: list[str], tmp_path: Path) -> None:
    data = pr.page_data({"flow": seed_reports, "one": seed_reports[0]}, {})
    one = [r for r in data["rows"] if r["policy"] == "one"]
    assert [set(r) for r in one] == [{"policy", "num_steps", "score", "success", "ms_per_env_p50", "ms_per_call_p50",
                                      "ms_per_call_p99"}] * 2  # a single path: the one-report row, as before
    rows = {r["num_steps"]: r for r in data["rows"] if r["policy"] == "flow"}
    assert list(rows) == [1, 8]
    row = rows[8]
    assert (row["n_seeds"], row["episodes_per_seed"], row["reports"]) == (3, 4, seed_reports)
    assert row["per_seed"]["k"] == [3, 2, 3] and (row["success"]["k"], row["success"]["n"]) == (8, 12)
    assert row["per_seed"]["success"] == [0.75, 0.5, 0.75]
    assert row["per_seed"]["score"] == pytest.approx([0.975, 0.875, 0.975])
    assert row["across_seeds"]["success_std"] == pytest.approx(np.std([0.75, 0.5, 0.75], ddof=1))
    assert row["across_seeds"]["score_mean"] == pytest.approx(np.mean([0.975, 0.875, 0.975]))
    assert row["across_seeds"]["score_std"] == pytest.approx(np.std([0.975, 0.875, 0.975], ddof=1))
    pooled = mean_ci([v for s in SEEDS for v in s[8]])
    assert (row["score"]["value"], row["score"]["lo"], row["score"]["hi"]) == (pooled.value, pooled.lo, pooled.hi)
    wilson = rate_ci([True] * 8 + [False] * 4)
    assert (row["success"]["lo"], row["success"]["hi"]) == (wilson.lo, wilson.hi)
    assert row["ms_per_env_p50"] == 16.0  # median over seeds of 8 x (1, 2, 3) ms
    assert rows[1]["per_seed"]["k"] == [2, 1, 1] and rows[1]["success"]["k"] == 4

    text = pr.render(json.loads(json.dumps(data)), tmp_path)  # from the JSON, as compose_results does
    assert "| one | 8 | 0.975 [" in text  # the one-report table stays
    assert "| policy | steps | seeds x episodes | score pooled [95% CI] | score per seed (mean ± std) |" in text
    assert (f"| flow | 8 | 3 x 4 | {pooled.value:.3f} [{pooled.lo:.3f}, {pooled.hi:.3f}] | 0.975, 0.875, 0.975 "
            f"(0.942 ± 0.058) | 0.67 [{wilson.lo:.2f}, {wilson.hi:.2f}] (8/12) | 0.75, 0.50, 0.75 (0.67 ± 0.14) "
            "| 16.00 |") in text
    assert "resamples the pooled episodes" in text


def test_only_multi_seed_rows_leave_out_the_one_report_table(seed_reports: list[str], tmp_path: Path) -> None:
    text = pr.render(pr.page_data({"flow": seed_reports}, {}), tmp_path)
    assert "| policy | sampler steps |" not in text and "## Several training seeds" in text


def test_disturbed_table(seed_reports: list[str], tmp_path: Path) -> None:
    shoved = [_write(tmp_path, f"shove_s{i}.json", _report({8: [v - 0.3 for v in s[8]]}, disturbance=SHOVE))
              for i, s in enumerate(SEEDS[:2])]
    data = pr.page_data({}, {}, disturbed=[("flow", "none", seed_reports), ("flow", "shove-block-40px", shoved)])
    rows = data["disturbed"]
    assert [(r["label"], r["num_steps"], r["n_seeds"]) for r in rows] == [
        ("none", 1, 3), ("none", 8, 3), ("shove-block-40px", 8, 2)]
    shove = rows[2]
    assert shove["disturbance"] == SHOVE and shove["success"]["k"] == 0 and shove["success"]["n"] == 8
    assert shove["per_seed"]["score"] == pytest.approx([0.675, 0.575])
    assert "shove after step 100: block 40.0" in shove["disturbance_text"]
    assert rows[0]["disturbance"] is None and rows[0]["disturbance_text"] == "no disturbance"
    assert data["rows"] == [] and data["protocol"]["n_episodes"] == 4  # the protocol from the disturbed reports
    text = pr.render(data, tmp_path)
    assert "## Success and score vs disturbance" in text
    assert "| flow | shove-block-40px | 8 | 2 x 4 | 0.625 [" in text
    assert "(0/8) | 0.00, 0.00 (0.00 ± 0.00) |" in text
    assert "- `shove-block-40px`: shove after step 100: block 40.0, agent 0.0, angle 0.0 rad (disturbance seed 0)" in text
    assert "- `none`: no disturbance" in text
    only8 = pr.page_data({}, {}, disturbed=[("flow", "none@8", seed_reports)])["disturbed"]
    assert [(r["label"], r["num_steps"]) for r in only8] == [("none", 8)]
    with pytest.raises(SystemExit, match="no num_steps 2"):
        pr.page_data({}, {}, disturbed=[("flow", "none@2", seed_reports)])
    one = pr.page_data({}, {}, disturbed=[("flow", "shove", shoved[:1])])["disturbed"][0]
    assert one["n_seeds"] == 1 and one["across_seeds"]["score_std"] is None
    assert "(one seed)" in pr.render(pr.page_data({}, {}, disturbed=[("flow", "shove", shoved[:1])]), tmp_path)


def test_seeds_evaluated_differently_are_refused(seed_reports: list[str], tmp_path: Path) -> None:
    shoved = _write(tmp_path, "shove.json", _report(SEEDS[0], disturbance=SHOVE))
    with pytest.raises(SystemExit, match="flow=shove.*differ in disturbance"):
        pr.page_data({}, {}, disturbed=[("flow", "shove", [shoved, seed_reports[1]])])
    with pytest.raises(SystemExit, match="--report flow.*differ in disturbance"):
        pr.page_data({"flow": [seed_reports[0], shoved]}, {})
    fewer_steps = _write(tmp_path, "steps8.json", _report({8: SEEDS[1][8]}))
    with pytest.raises(SystemExit, match="num_steps settings"):
        pr.page_data({"flow": [seed_reports[0], fewer_steps]}, {})
    with pytest.raises(SystemExit, match="given twice"):
        pr.page_data({"flow": [seed_reports[0], seed_reports[0]]}, {})
    fewer_episodes = _write(tmp_path, "short.json", _report({1: [1.0, 1.0], 8: [1.0, 1.0]}))
    with pytest.raises(SystemExit, match="episodes per setting"):
        pr.page_data({"flow": [seed_reports[0], fewer_episodes]}, {})


def test_cli_values() -> None:
    assert pr._path_lists(["a=x.json", "b=x.json,y.json"]) == {"a": "x.json", "b": ["x.json", "y.json"]}
    assert pr._disturbed_triples(["flow=obs-noise-5px=a.json,b.json", "flow=none=c.json"]) == [
        ("flow", "obs-noise-5px", ["a.json", "b.json"]), ("flow", "none", ["c.json"])]
    with pytest.raises(SystemExit, match=r"NAME=LABEL\[@STEPS\]="):
        pr._disturbed_triples(["flow=a.json"])


def _analysis(tmp_path: Path, name: str, **stats: float) -> str:
    base = {"n": 64.0, "num_steps": 8.0, "delta": 0.01, "gain_noise_mean": 0.03, "gain_noise_max": 0.15,
            "gain_mid_mean": 0.05, "gain_mid_max": 0.2, "jac_full_max": 3.0, "jac_full_mean": -1.5,
            "jac_full_min": -4.0}
    return _write(tmp_path, name, {**base, **stats})


def test_analysis_mean_over_seeds_and_certified_table(seed_reports: list[str], tmp_path: Path) -> None:
    plain = _analysis(tmp_path, "plain.json")
    res = [_analysis(tmp_path, f"res{i}.json", certified_rate_min=0.1 * (i + 1), certified_rate_mean=0.2,
                     jac_full_max=2.0 + i, jac_residual_max=-0.1, gain_obs_mean=0.5, gain_obs_max=1.0 + i,
                     base_gain_obs_mean=0.4, base_gain_obs_max=0.9) for i in range(2)]
    data = pr.page_data({"flow": seed_reports[0]}, {}, {"base": plain, "resft": res})
    base_row, res_row = data["robustness"]
    assert base_row == {"policy": "base", "num_steps": 8, **{k: json.loads(Path(plain).read_text())[k]
                                                            for k in pr.ROBUSTNESS_KEYS if k != "jac_residual_max"}}
    assert res_row["n_seeds"] == 2 and res_row["jac_full_max"] == 2.5
    assert res_row["certified_rate_min"] == pytest.approx(0.15) and res_row["gain_obs_max"] == 1.5
    text = pr.render(data, tmp_path)
    assert "| resft (mean of 2 seeds) | 8 | 0.03 | 0.15 | 0.05 | 0.2 | 2.5 | -1.5 | -0.1 |" in text
    assert "| policy | steps | certified_rate_min | certified_rate_mean | jac_full_max | gain_obs_mean |" in text
    assert "| resft (mean of 2 seeds) | 8 | 0.15 | 0.2 | 2.5 | 0.5 | 1.5 | 0.4 | 0.9 |" in text
    assert "| base | 8 | -" not in text  # rows without any certified / observation key stay out of that table
    no_extras = pr.render(pr.page_data({"flow": seed_reports[0]}, {}, {"base": plain}), tmp_path)
    assert "certified_rate_min" not in no_extras  # the one-table page of before
    other_steps = _analysis(tmp_path, "s4.json", num_steps=4.0)
    with pytest.raises(SystemExit, match="different num_steps"):
        pr.page_data({"flow": seed_reports[0]}, {}, {"base": [plain, other_steps]})


def _run(tmp_path: Path, name: str, steps: int, batch: int, seconds: float, loss: float) -> str:
    run = tmp_path / name
    run.mkdir()
    (run / "training_sessions.json").write_text(json.dumps([
        {"steps": [0, steps // 2], "seconds": seconds / 2, "batch_size": batch, "parameters": 1_180_000,
         "device": "cpu", "hardware": "AMD EPYC, 2 cores", "torch_threads": 1, "final_train_loss": loss + 0.01},
        {"steps": [steps // 2, steps], "seconds": seconds / 2, "batch_size": batch, "parameters": 1_180_000,
         "device": "cpu", "hardware": "AMD EPYC, 2 cores", "torch_threads": 1, "final_train_loss": loss}]))
    return str(run)


def test_training_time_over_seeds_and_fine_tuning_cost(seed_reports: list[str], tmp_path: Path) -> None:
    base = [_run(tmp_path, f"base{i}", 8000, 128, 1200 + 120 * i, 0.04) for i in range(2)]
    ft = [_run(tmp_path, f"ft{i}", 2000, 64, 300 + 60 * i, -2.9) for i in range(3)]
    single = _run(tmp_path, "single", 1000, 64, 240, -2.7)
    data = pr.page_data({"flow": seed_reports}, {"base": base, "ft": ft, "res": single}, base="base")
    runs = {r["name"]: r for r in data["runs"]}
    assert runs["base"]["training_min_per_seed"] == [20.0, 22.0] and runs["base"]["training_min"] == 21.0
    assert runs["base"]["samples_per_seed"] == [8000 * 128] * 2 and runs["ft"]["training_min"] == 6.0
    assert runs["res"]["run_dir"] == single and runs["res"]["training_min"] == 4.0  # one path: as before
    cost = {r["name"]: r for r in data["cost"]["rows"]}
    assert cost["ft"]["minutes_fraction"] == pytest.approx(6 / 21)
    assert cost["ft"]["samples_fraction"] == 2000 * 64 / (8000 * 128)
    assert cost["res"]["minutes_fraction"] == pytest.approx(4 / 21) and cost["res"]["samples"] == 64_000
    text = pr.render(data, tmp_path)
    assert ("- **base** (2 seeds: " in text and "8000 steps at batch 128 per seed, 1.18 M parameters, 21.0 ± 1.4 min "
            "of training per seed (mean ± std over seeds; 20.0, 22.0)" in text)
    assert "- **ft**: 6.0 min = 0.29 of the pre-training time; 128,000 samples = 0.125 of the pre-training" in text
    with pytest.raises(SystemExit, match="--base nope"):
        pr.page_data({"flow": seed_reports}, {"base": base}, base="nope")

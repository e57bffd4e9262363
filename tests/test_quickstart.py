"""`fm-policy quickstart` (README command 1) end to end at toy sizes: collect, train, evaluate, report."""

from __future__ import annotations

import json

import pytest

from fm_policy.cli import main

pytestmark = pytest.mark.slow


def test_quickstart_runs_the_whole_loop(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--episodes", "2", "--steps", "20", "--eval-episodes", "2", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "[1/3] collecting 2 Push-T expert demonstrations" in out and "quickstart done" in out
    report = json.loads((tmp_path / "runs/quickstart/eval/eval.json").read_text())
    assert [s["num_steps"] for s in report["settings"]] == [1, 4, 8]
    assert list((tmp_path / "runs/quickstart/eval/videos").glob("*.mp4"))

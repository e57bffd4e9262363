"""The results pages and the README's results table are exactly what their committed JSON renders to.

`python -m fm_policy.eval.benchmarks.compose_results` renders every page of docs/results (and the README's headline
table) from the JSON beside it; here it renders into a temporary folder and the output must equal the committed
files, so a number edited on a page by hand, instead of in its JSON, fails the suite.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
NOT_PAGES = {"pusht_notes", "finetuning_notes", "finetuning_scripted_notes", "finetuning_scripted_one_seed_notes"}  # prose appended to pusht.md / finetuning*.md, no numbers of their own


@pytest.fixture(scope="module")
def compose_results():
    from fm_policy.eval.benchmarks import compose_results

    return compose_results


def test_every_results_page_is_rendered_from_json(compose_results) -> None:
    pages = {p.stem for p in RESULTS.glob("*.md")} - NOT_PAGES
    assert pages == set(compose_results.all_pages()), "register new results pages in compose_results"
    for page in pages:
        assert (RESULTS / f"{page}.json").exists(), f"docs/results/{page}.md has no {page}.json beside it"


def test_committed_pages_equal_their_rendering(compose_results, tmp_path: Path) -> None:
    assert compose_results.main(["--root", str(ROOT), "--out-dir", str(tmp_path)]) == 0
    rendered = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.md"))
    assert Path("README.md") in rendered and len(rendered) == len(compose_results.all_pages()) + 1
    differ = [str(rel) for rel in rendered if (tmp_path / rel).read_text() != (ROOT / rel).read_text()]
    assert not differ, (f"{differ} differ from what their JSON renders to: change the JSON (or the script that writes "
                        "it), then run `python -m fm_policy.eval.benchmarks.compose_results`")


def test_a_hand_edited_number_is_caught(compose_results, tmp_path: Path) -> None:
    shutil.copytree(RESULTS, tmp_path / "docs" / "results")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    page = tmp_path / "docs" / "results" / "pusht.md"
    text = page.read_text()
    assert "0.869 [0.815, 0.917]" in text
    page.write_text(text.replace("0.869 [0.815, 0.917]", "0.899 [0.815, 0.917]", 1))
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace("| 47% [38, 57] |", "| 57% [38, 57] |", 1))
    assert compose_results.main(["--root", str(tmp_path), "--check", "--page", "pusht"]) == 1
    assert compose_results.main(["--root", str(tmp_path), "--check", "--page", "kitchen", "--no-readme"]) == 0
    assert compose_results.main(["--root", str(tmp_path), "--page", "pusht"]) == 0  # re-rendering repairs both
    assert compose_results.main(["--root", str(tmp_path), "--check", "--page", "pusht"]) == 0


def test_half_up_rounds_transcribed_decimals_as_written(compose_results) -> None:
    assert compose_results.half_up(30.95, 1) == "31.0"  # binary rounding of 30.95 would give 30.9
    assert compose_results.half_up(3.48, 1) == "3.5" and compose_results.half_up(370.72) == "371"

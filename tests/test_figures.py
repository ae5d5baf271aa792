"""The figures in docs/figures.md and the README are what `make figures` renders from bench/results/*.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import figures

ROOT = Path(__file__).resolve().parent.parent


def test_committed_figures_are_what_make_figures_renders() -> None:
    assert (ROOT / "docs" / "figures.md").read_text() == figures.render_figures(), (
        "docs/figures.md is stale: run `make figures`"
    )
    readme = (ROOT / "README.md").read_text()
    assert readme == figures.splice(readme, figures.render_headline()), "the README's figures are stale: `make figures`"
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    block = figures.render_deploy_costs()
    assert deploy == figures.splice(deploy, block, figures.COST_START, figures.COST_END), (
        "docs/deploy.md's cost table is stale: `make figures`"
    )


def test_a_changed_result_changes_the_figures(tmp_path: Path) -> None:
    """Render from a copy of the results with one figure changed: both outputs follow the JSON."""
    results = tmp_path / "results"
    shutil.copytree(figures.RESULTS, results)
    embed = json.loads((results / "embed.json").read_text())
    embed["ort_fp32_img_s"] = 4321.5
    (results / "embed.json").write_text(json.dumps(embed))

    page, headline = figures.render_figures(results), figures.render_headline(results)
    assert page != figures.render_figures() and headline != figures.render_headline()
    assert "4,321.5" in page and "4,321.5" in headline
    readme = (ROOT / "README.md").read_text()
    assert figures.splice(readme, headline) != readme  # so the README comparison above can fail


def _crash_row(headline: str) -> str:
    (row,) = [line for line in headline.splitlines() if line.startswith("| [crash trials]")]
    return row


def test_every_table_names_its_machine(tmp_path: Path) -> None:
    """A file without ``device`` renders "not recorded"; one with it names it, in the page and the README."""
    results = tmp_path / "results"
    shutil.copytree(figures.RESULTS, results)
    crash = json.loads((results / "crash.json").read_text())
    crash.pop("device", None)
    (results / "crash.json").write_text(json.dumps(crash))
    page = figures.render_figures(results)
    section = page[page.index("## Crash trials") :]
    assert "Machine: **not recorded**" in section
    assert _crash_row(figures.render_headline(results)).endswith("| not recorded |")

    crash["device"] = "Test CPU, 3 cores, x86_64"
    (results / "crash.json").write_text(json.dumps(crash))
    page = figures.render_figures(results)
    assert "Machine: **Test CPU, 3 cores, x86_64**" in page[page.index("## Crash trials") :]
    assert _crash_row(figures.render_headline(results)).endswith("| Test CPU, 3 cores, x86_64 |")
    for name in figures.SECTIONS:  # every section says where it was measured
        heading = page.index(f"bench/results/{name}.json")
        assert "Machine: **" in page[heading : heading + 300], name
    rows = [line for line in figures.render_headline(results).splitlines() if line.startswith("| [")]
    assert len(rows) == len(figures.SECTIONS)


def test_a_missing_figure_is_an_error_not_a_blank(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(figures.RESULTS, results)
    http = json.loads((results / "http.json").read_text())
    del http["collections"]
    (results / "http.json").write_text(json.dumps(http))
    with pytest.raises(figures.FiguresError, match="http.json has no 'collections'"):
        figures.render_figures(results)
    with pytest.raises(figures.FiguresError, match="needs the lines"):
        figures.splice("# a README without markers\n", "table")


def test_plots_that_exist_are_linked() -> None:
    page = figures.render_figures()
    for plot in sorted(figures.RESULTS.glob("*.png")):
        assert f"](../bench/results/{plot.name})" in page, plot.name


def test_reliability_from_one_full_run(tmp_path: Path) -> None:
    """Once `make bench-reliability` writes its crash figures and device, the page and README show them."""
    results = tmp_path / "results"
    shutil.copytree(figures.RESULTS, results)
    rel = json.loads((results / "reliability.json").read_text())
    rel.update(crash_trials=30, crash_lost=0, crash_duplicated=0, query_failures=0, problems=[], device="Box, 2 cores")
    (results / "reliability.json").write_text(json.dumps(rel))
    page = figures.render_figures(results)
    section = page[page.index("## Reliability") : page.index("## Crash trials")]
    assert "Machine: **Box, 2 cores**" in section and "**30 trials**, **0 lost, 0 duplicated**" in section
    assert "there are any): none." in section
    row = next(line for line in figures.render_headline(results).splitlines() if "docs/figures.md#reliability" in line)
    assert "30 crash trials: **0 lost, 0 duplicated**" in row and row.endswith("| Box, 2 cores |")


def test_cost_table_follows_its_counts(tmp_path: Path) -> None:
    """docs/deploy.md's cost table is arithmetic on cost.json: doubling a step's requests shows in it."""
    results = tmp_path / "results"
    shutil.copytree(figures.RESULTS, results)
    before = figures.render_deploy_costs(results)
    cost = json.loads((results / "cost.json").read_text())
    for run in cost["runs"]:
        for phase in run["phases"]:
            phase["requests"]["reindex"] = {k: 2 * v for k, v in phase["requests"]["reindex"].items()}
    (results / "cost.json").write_text(json.dumps(cost))
    after = figures.render_deploy_costs(results)
    assert after != before and "cost.json" in after
    assert "GPU-seconds" in after and "Flex Consumption" in after

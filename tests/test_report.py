"""The run report: tables with the best marked, and report.md / report.html from a real tiny run.

No browser here: the HTML is parsed with the standard library and checked section by section.
"""
from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from smoothpurify import SmoothPurifyError
import torch
import yaml
from rich.console import Console

from conftest import tiny_images
from smoothpurify.checkpoint import write_json
from smoothpurify.metrics import BACKDOOR_METRICS
from pipeline.report.tables import REFERENCE, method_columns, method_rows, print_table, smoothness_rows
from pipeline.report.document import params_as_run, write_report

METHOD_COLUMNS = method_columns(BACKDOOR_METRICS)
SECTIONS = ["Verdict", "Purification results", "Attack settings", "Data source", "Smoothness", "Figures",
            "Parameters"]
PNG = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Collects headings, tables (cell text + best flag), images and <pre> blocks."""

    def __init__(self, text: str):
        super().__init__()
        self.h1, self.h2, self.tables, self.images, self.pre = [], [], [], [], []
        self.external, self._tag, self._cell = [], None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("link", "script", "iframe") or (tag == "img" and not a.get("src", "").startswith("data:")):
            self.external.append((tag, a))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ["", "best" in (a.get("class") or "")]
        elif tag == "img":
            self.images.append(a)
        elif tag in ("h1", "h2", "pre"):
            self._tag = tag
            getattr(self, tag).append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append((self._cell[0].strip(), self._cell[1]))
            self._cell = None
        elif tag == self._tag:
            self._tag = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data
        elif self._tag:
            getattr(self, self._tag)[-1] += data


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    """The real stages on tiny data: benign + badnets, purified by ft and ngf, all four analysed."""
    from modalities.image import ImageModality
    from modalities.image import data as imdata
    import pipeline
    from pipeline.analysis import analyze_stage
    from modalities.contract import register_modality

    register_modality("image", ImageModality)
    splits = {"train": tiny_images(1500, 0), "test": tiny_images(400, 1)}
    params = {"seed": 0, "profile": "test", "run_dir": str(tmp_path_factory.mktemp("report") / "runs"),
              "note": "<script>alert(1)</script> & co",  # must come out escaped in the HTML
              "image": {"dataset": "fashion_mnist", "val_fraction": 0.05, "model": "small_cnn",
                        "attack": {"target_label": 0, "poison_rate": 0.1},
                        "train": {"epochs": 4, "lr": 0.05, "batch_size": 64}},
              # no augmentation: the tiny images' class is a bar's row, which a shift changes
              "purify": {"common": {"epochs": 2, "augment": False}, "curve_every": 1},
              "analysis": {"n_clean": 30, "n_poison": 30, "lanczos_steps": 5, "n_probes": 3, "grid": 100}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imdata, "load_embedded", lambda cache: (splits, "tiny synthetic (tests)"))
        pipeline.prepare("image", params)
        for name in ("benign", "badnets"):
            pipeline.train_attack("image", params, name, progress=False)
        pipeline.evaluate("image", params, "badnets")
        for method in ("ft", "ngf"):
            pipeline.purify("image", params, "badnets", method, progress=False)
    for name in ("benign", "badnets", "purified/ft", "purified/ngf"):
        analyze_stage("image", params, "badnets", name)
    md, page = write_report("image", params, ["badnets"], ["ft", "ngf", "sft"])  # sft never ran: skipped
    return params, md, page


def test_html_is_self_contained_and_has_every_section(tiny_run):
    params, _, page = tiny_run
    text = page.read_text()
    doc = Page(text)
    assert doc.h1 == ["smoothpurify report: image (profile test)"] and doc.h2 == SECTIONS
    assert doc.external == [] and "http://" not in text and "https://" not in text
    assert len(doc.images) == 4  # verdict, density, curves, t-SNE
    for img in doc.images:
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == PNG and img["alt"]
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in text
    assert "tiny synthetic (tests)" in text
    # the parameters of what ran, as a YAML block that reads back to the very same dict
    shown = yaml.safe_load(doc.pre[0])
    assert shown == params_as_run(params, "image", ["badnets"], ["ft", "ngf", "sft"])
    assert shown["image"]["attacks"] == ["badnets"] and shown["purify"]["methods"] == ["ft", "ngf", "sft"]
    assert yaml.safe_load(doc.pre[1])["methods"]["ngf"]["parametrization"] == "last_layer"


def test_html_tables_hold_the_run_numbers(tiny_run):
    params, _, page = tiny_run
    root = Path(params["run_dir"]) / "image"
    method_table, attack_table, smooth_table = Page(page.read_text()).tables
    assert attack_table[1][0][0] == "badnets" and "target_label=0" in attack_table[1][1][0]
    header = [c for c, _ in method_table[0]]
    assert header == [h for _, h in METHOD_COLUMNS]
    body = {row[1][0]: row for row in method_table[1:]}
    assert list(body) == [REFERENCE, "ft", "ngf"]
    for method in ("ft", "ngf"):
        rec = json.loads((root / "metrics" / "purify" / f"badnets-{method}.json").read_text())
        assert float(body[method][3][0]) == pytest.approx(100 * rec["after"]["asr"], abs=0.006)
        assert float(body[method][6][0]) == pytest.approx(rec["seconds"]["total"], abs=0.006)
        assert body[method][2][0] in ("removed", "removed at a cost", "reduced", "not removed", "diverged")
    # best marks: only among the rows whose verdict is "removed", exactly the extreme values of each column
    assert not any(best for _, best in body[REFERENCE])
    removed = [m for m in ("ft", "ngf") if body[m][2][0] == "removed"]
    for col, pick in ((3, min), (4, max), (5, max), (6, min)):
        values = {m: float(body[m][col][0]) for m in removed}
        tied = len(set(values.values())) <= 1  # nobody is "best" alone or where all are equal
        expected = set() if tied else {m for m, v in values.items() if v == pick(values.values())}
        assert {m for m in ("ft", "ngf") if body[m][col][1]} == expected
    models = [row[1][0] for row in smooth_table[1:]]
    assert models == ["benign (reference)", "backdoored (before)", "ft (after)", "ngf (after)"]
    stored = json.loads((root / "metrics" / "analysis" / "badnets-backdoored.json").read_text())
    assert smooth_table[2][2][0] == f"{stored['lambda_max']:.2f}"


def test_markdown_has_the_same_sections_and_figures_on_disk(tiny_run):
    params, md, _ = tiny_run
    text = md.read_text()
    assert re.findall(r"^## (.+)$", text, flags=re.M) == SECTIONS
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["figures/verdict.png", "figures/density/badnets.png", "figures/curves/badnets.png",
                     "figures/tsne/badnets.png"]
    for link in links:
        png = md.parent / link
        assert png.read_bytes()[:8] == PNG and png.with_suffix(".csv").is_file()
    assert "| badnets | ngf |" in text and "```yaml" in text
    curves = (md.parent / "figures" / "curves" / "badnets.csv").read_text().splitlines()
    assert curves[0] == "method,epoch,val_loss,acc,asr,ra,lambda_max" and len(curves) == 1 + 2 + 2


def test_smoothness_rows_flag_numbers_from_other_settings(tiny_run):
    params, _, _ = tiny_run
    assert not any(r["stale"] for r in smoothness_rows("image", params, ["badnets"], ["ft", "ngf"]))
    other = {**params, "analysis": {**params["analysis"], "n_probes": 50, "threads": 2}}  # threads: no matter
    rows = smoothness_rows("image", other, ["badnets"], ["ft", "ngf"])
    assert len(rows) == 4 and all(r["stale"] and r["model"].endswith("[other settings]") for r in rows)


def _fake_run(tmp_path: Path, results: dict[str, dict]) -> dict:
    params = {"run_dir": str(tmp_path / "runs")}
    root = tmp_path / "runs" / "image"
    write_json(root / "metrics" / "badnets.json", {"backdoored": {"acc": 0.9, "asr": 1.0, "ra": 0.0}})
    for method, (asr, acc, ra, sec) in results.items():
        write_json(root / "metrics" / "purify" / f"badnets-{method}.json",
                   {"before": {"acc": 0.91, "asr": 0.99, "ra": 0.01}, "after": {"asr": asr, "acc": acc, "ra": ra},
                    "seconds": {"total": sec} if method != "anp" else sec})
    return params


def test_method_rows_judge_each_method_and_mark_the_best_among_the_removed(tmp_path):
    # before: ASR 99 %, ACC 91 %; thresholds: removed at ASR <= 5 % with an ACC drop <= 5 points
    params = _fake_run(tmp_path, {"ft": (0.50, 0.90, 0.40, 3.0), "sft": (0.02, 0.88, 0.85, 9.0),
                                  "ngf": (0.01, 0.86, 0.80, 0.5), "anp": (0.30, 0.90, 0.60, 2.0),
                                  "fp": (0.03, 0.80, 0.70, 1.0)})
    rows = method_rows("image", params, ["badnets", "wanet"], ["ft", "sft", "ngf", "anp", "fp", "nad"])
    assert [r["method"] for r in rows] == [REFERENCE, "ft", "sft", "ngf", "anp", "fp"]  # wanet, nad: nothing yet
    assert rows[0]["asr"] == 99.0 and rows[0]["reference"] and rows[0]["best"] == []
    assert {r["method"]: r["verdict"] for r in rows[1:]} == {
        "ft": "not removed", "sft": "removed", "ngf": "removed", "anp": "reduced", "fp": "removed at a cost"}
    best = {r["method"]: set(r["best"]) for r in rows[1:]}
    # ft and anp have higher ACC than both, but they left the backdoor in: never best
    assert best == {"ft": set(), "sft": {"acc", "ra"}, "ngf": {"asr", "seconds"}, "anp": set(), "fp": set()}
    assert rows[4]["seconds"] == 2.0  # a bare number of seconds is accepted too
    marked = method_rows("image", params, ["badnets"], ["ft", "sft", "ngf"], mark_best=True)
    assert marked[3]["asr"] == "[bold green]1.00 *[/]" and marked[1]["asr"] == "50.00"
    console = Console(record=True, width=120)
    print_table(marked, "badnets", METHOD_COLUMNS, console=console)
    out = console.export_text()
    assert "1.00 *" in out and "[bold" not in out and "no defense" in out
    lone = method_rows("image", _fake_run(tmp_path / "one", {"ft": (0.5, 0.9, 0.4, 3.0)}), ["badnets"], ["ft"])
    assert lone[1]["best"] == []  # a lone method is not "best" at anything


def test_a_diverged_run_is_labelled_and_never_best(tmp_path):
    params = _fake_run(tmp_path, {"ft": (0.50, 0.90, 0.40, 3.0), "sft": (0.0, 0.10, 0.11, 9.0),
                                  "ngf": (0.30, 0.86, 0.60, 0.5)})
    path = Path(params["run_dir"]) / "image" / "metrics" / "purify" / "badnets-sft.json"
    write_json(path, {**json.loads(path.read_text()), "diverged": True})
    rows = method_rows("image", params, ["badnets"], ["ft", "sft", "ngf"])
    assert [r["method"] for r in rows] == [REFERENCE, "ft", "sft (diverged)", "ngf"]
    assert rows[2]["best"] == [] and rows[2]["verdict"] == "diverged"  # ASR 0 of a destroyed model is not best


def test_a_report_without_any_result_is_refused_and_writes_nothing(tmp_path):
    params = {"run_dir": str(tmp_path / "runs"), "profile": "smoke"}
    with pytest.raises(SmoothPurifyError, match="nothing to report"):
        write_report("image", params, ["badnets"], ["sft"])
    assert not (tmp_path / "runs").exists()


def test_a_browser_shows_the_verdict_on_the_first_screen(tiny_run, tmp_path):
    """Headless Chromium (Debian package) renders the page; skipped where no browser is installed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("screenshot_report", Path(__file__).parents[1] / "tools" /
                                                  "screenshot_report.py")
    shot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shot)
    if shot.find_browser() is None:
        pytest.skip("no Chromium here (apt-get install chromium)")
    from PIL import Image

    _, _, page = tiny_run
    png = Image.open(shot.screenshot(page, tmp_path / "first.png")).convert("L")
    assert png.size == (1280, 900)
    # The verdict's highlighted line (a blue bar at its left) is drawn within the first screen.
    pixels = np.asarray(Image.open(tmp_path / "first.png").convert("RGB")).astype(int)
    blue = (abs(pixels[..., 0] - 0x2E) < 30) & (abs(pixels[..., 1] - 0x86) < 30) & (abs(pixels[..., 2] - 0xC1) < 30)
    assert blue[:, :200].sum() > 50

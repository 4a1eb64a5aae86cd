"""report.html and predictions.html in a real headless browser (Chromium): every image loads, every link target
exists, nothing is fetched from the network; screenshots are saved.

Chromium is driven through its command line (`--dump-dom`, `--screenshot`), no WebDriver: the page is copied next
to itself with a small script appended that, on the load event, records what the browser saw (each image's
natural size, missing #anchors, the page's links) into the DOM, which `--dump-dom` prints. Chromium is a test
requirement like the Fashion-MNIST data: without it these tests fail, saying how to install it (`.ci/run` installs
Debian's `chromium`).
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toolkit.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PREDICT = ROOT / "export" / "predict.py"
SHOTS = Path(os.environ.get("DINOQPM_SCREENSHOTS", "")) if os.environ.get("DINOQPM_SCREENSHOTS") else None

CHECK_JS = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var hrefs = Array.prototype.map.call(document.querySelectorAll('a[href]'), function (a) {
    return a.getAttribute('href'); });
  var result = {
    images: imgs.map(function (i) { return {src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0,
                                            width: i.naturalWidth, height: i.naturalHeight}; }),
    missing_anchors: hrefs.filter(function (h) {
      return h.charAt(0) === '#' && !document.getElementById(decodeURIComponent(h.slice(1))); }),
    hrefs: hrefs,
    ids: Array.prototype.map.call(document.querySelectorAll('[id]'), function (e) { return e.id; }),
    height: document.documentElement.scrollHeight
  };
  var pre = document.createElement('pre');
  pre.id = 'browser-check';
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>
"""


def chromium() -> str | None:
    """The Chromium executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run_browser(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    exe = chromium()
    assert exe is not None
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start. A fresh profile per call.
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               "--no-first-run", f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=profile)


def _sibling_with(page: Path, extra: str, name: str) -> Path:
    """A copy of `page` in the same folder (so its relative links resolve the same way) with `extra` appended to
    its body."""
    copy = page.with_name(name)
    text = page.read_text(encoding="utf-8")
    assert "</body>" in text, f"{page} is not a complete HTML page"
    copy.write_text(text.replace("</body>", extra + "</body>"), encoding="utf-8")
    return copy


def check_page(page: Path) -> dict:
    """What a real browser sees when it opens `page` from disk (see the module docstring)."""
    copy = _sibling_with(page, CHECK_JS, f".{page.stem}.check.html")
    try:
        proc = _run_browser(["--virtual-time-budget=20000", "--dump-dom", copy.as_uri()])
    finally:
        copy.unlink()
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the check script did not run in the browser: {proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, out: Path, *, element: str | None = None, width: int = 1280, height: int = 1000) -> Path:
    """A PNG of `page`, or of only the element with id `element` (everything else hidden), at the given size."""
    target = page
    if element is not None:
        only = (f"<script>var e = document.getElementById({json.dumps(element)}); document.body.innerHTML = ''; "
                "document.body.appendChild(e);</script>")
        target = _sibling_with(page, only, f".{page.stem}.shot.html")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        proc = _run_browser(["--virtual-time-budget=20000", f"--window-size={width},{height}",
                             f"--screenshot={out}", target.as_uri()])
    finally:
        if target != page:
            target.unlink()
    assert out.is_file(), proc.stderr[-2000:]
    return out


def assert_page_sound(page: Path, seen: dict, *, min_images: int) -> None:
    """Every image loaded with a real size, every #link has its target, every relative link is a file beside the
    page, and nothing points at the network."""
    broken = [i["src"] for i in seen["images"] if not i["ok"]]
    assert not broken, f"{page.name}: images that did not load: {broken[:5]}"
    assert len(seen["images"]) >= min_images, (page.name, len(seen["images"]))
    assert not seen["missing_anchors"], f"{page.name}: links to missing anchors {seen['missing_anchors'][:5]}"
    assert len(set(seen["ids"])) == len(seen["ids"]), f"{page.name}: duplicate ids"
    for href in seen["hrefs"]:
        assert not re.match(r"^[a-z]+://", href), f"{page.name} links to {href}: the page must work offline"
        if not href.startswith("#"):
            assert (page.parent / href).is_file(), f"{page.name} links to {href}, which is not there"
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["'](https?:)?//""", text), "the page loads something from the network"


# -------------------------------------------------------------------------------------------------------- fixture


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny run evaluated (report.html) with one image added by the explain CLI, and predict.py's page for its
    ONNX export with one unreadable input among two readable ones."""
    if chromium() is None:
        pytest.fail("no Chromium here: install Debian's `chromium` (`apt-get install chromium`, as .ci/run does); "
                    "the browser checks need a real browser")
    from export.to_onnx import main as export_main
    from toolkit.data import load_dataset
    from toolkit.explain.cli import main as explain_main
    from toolkit.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("browser")
    overrides = [f"cache.root={tmp / 'artifacts'}", f"runtime.output_dir={tmp / 'runs'}", "runtime.progress=false"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    run_dir = run_pipeline(cfg).run_dir
    images = tmp / "images"
    images.mkdir()
    test_set = load_dataset(cfg.data, "test")
    for i in (0, 1):
        test_set[i][0].save(images / f"sample{i}.png")
    (images / "broken.png").write_bytes(b"this is not a PNG")
    with contextlib.redirect_stdout(io.StringIO()):
        assert explain_main(["--run", str(run_dir), "--images", str(images / "sample0.png")]) == 0
        onnx = tmp / "tiny.onnx"
        assert export_main(["--run", str(run_dir), "--out", str(onnx), "--no-unfolded-report"]) == 0
    out = tmp / "pred"
    proc = subprocess.run([sys.executable, str(PREDICT), "--model", str(onnx),
                           "--images", str(images), "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""})
    return {"run": run_dir, "cfg": cfg, "report": run_dir / "report.html", "predictions": out / "predictions.html",
            "predict_proc": proc, "images": images}


# ---------------------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_report_html_in_a_browser(pages: dict, tmp_path: Path) -> None:
    report = pages["report"]
    seen = check_page(report)
    index = json.loads((pages["run"] / "explanations" / "index.json").read_text())
    k, n_classes = len(index["global"]["selection"]), len(index["classes"])
    # global + k atlas strips + class example strips + contrasts + local views (incl. the added one).
    assert_page_sound(report, seen, min_images=k + n_classes + len(index["locals"]) + 1)
    ids = set(seen["ids"])
    assert {f"f{j}" for j in range(k)} <= ids and {f"class-{c}" for c in range(n_classes)} <= ids
    assert {"metrics", "curves", "qp", "global", "features", "classes", "local", "local-added"} <= ids
    # The matrix links every used feature and every class to its card.
    hrefs = set(seen["hrefs"])
    used = [j for j, d in enumerate(index["global"]["degree"]) if d]
    assert {f"#f{j}" for j in used} <= hrefs and {f"#class-{c}" for c in range(n_classes)} <= hrefs
    # Atlas strips hold top_n tiles of 128 px; the browser decoded them at that size.
    atlas = json.loads((pages["run"] / "explanations" / "atlas.json").read_text())
    strip = next(i for i in seen["images"] if i["src"] == "explanations/" + atlas["features"][0]["png"])
    assert strip["height"] == 128 and strip["width"] == atlas["top_n"] * 132 - 4
    # The added image is on the page, and the curves are drawn for every training stage.
    text = report.read_text()
    assert "sample0.png" in text and text.count("<polyline") >= 2 * 3
    shots = SHOTS or tmp_path
    for name, element in (("report_top", None), ("report_global", "global"), ("report_feature", "f0"),
                          ("report_class", "class-0")):
        png = screenshot(report, shots / f"{name}.png", element=element)
        with Image.open(png) as im:
            assert im.size == (1280, 1000)
            # Not a blank page: a rendered report has text, lines and pictures in many colours.
            assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 50, name


@pytest.mark.slow
def test_predictions_html_in_a_browser(pages: dict, tmp_path: Path) -> None:
    proc = pages["predict_proc"]
    # One unreadable input: the other two are predicted, the failure is listed, the exit status says so.
    assert proc.returncode == 1, proc.stderr
    assert "broken.png" in proc.stderr
    result = json.loads(pages["predictions"].with_name("predictions.json").read_text())
    assert [Path(p["image"]).name for p in result["predictions"]] == ["sample0.png", "sample1.png"]
    assert result["num_failed"] == 1 and Path(result["failed"][0]["image"]).name == "broken.png"
    assert "cannot read image file" in result["failed"][0]["error"]
    for p in result["predictions"]:
        assert all(f["weight"] == 1.0 for f in p["features"])  # W_cj, as in toolkit.explain's JSON
    page = pages["predictions"]
    seen = check_page(page)
    assert_page_sound(page, seen, min_images=2)
    assert {"img-0", "img-1", "failed"} <= set(seen["ids"])
    assert "broken.png" in page.read_text() and "cannot read image file" in page.read_text()
    png = screenshot(page, (SHOTS or tmp_path) / "predictions.png")
    with Image.open(png) as im:
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 50


@pytest.mark.slow
def test_the_check_catches_a_broken_image_and_a_dangling_link(pages: dict) -> None:
    """The browser check is not vacuous: a page with a missing image and a link to a missing anchor fails it."""
    bad = pages["run"] / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><h1 id="top">x</h1><img src="explanations/nope.png" alt="">'
                   '<a href="#top">ok</a> <a href="#nowhere">bad</a></body></html>')
    seen = check_page(bad)
    assert [i["src"] for i in seen["images"] if not i["ok"]] == ["explanations/nope.png"]
    assert seen["missing_anchors"] == ["#nowhere"]
    with pytest.raises(AssertionError):
        assert_page_sound(bad, seen, min_images=1)
    bad.unlink()

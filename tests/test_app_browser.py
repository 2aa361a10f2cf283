"""The app in a real browser: `streamlit run app.py` on a loopback port, driven by Debian's Chromium through
Playwright (no browser download). Upload an image, wait for the overlay, change views, click a detection and a
cell of the weight map, open a second session; screenshots and timings are saved.

Skips, with the reason, where /usr/bin/chromium or Playwright is missing (`.ci/run` installs Chromium).
Screenshots go to $ASFF_VIZ_SCREENSHOTS when set, else to the test's temporary folder; `timings.json` beside
them holds the measured upload -> first overlay and view change -> redraw times. The app runs on the embedded
default model when installed (else a small random one); $ASFF_VIZ_BROWSER_WEIGHTS names another checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 120_000  # the model's first run on a busy CPU can be slow; a stuck page still fails

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no Chromium at {CHROMIUM}: install Debian's package "
                       "(apt-get install chromium) to run the real-browser test"),
]

# JavaScript helpers run in the page. Plotly charts are `.js-plotly-plot` divs holding their data.
FIND_TRACE = """
(args) => {
  // The page position of point `args.point` of the trace named `args.name`; with args.inside, of the first point
  // from that index on that lies well inside the plot (a box centre on the image's edge is hard to click).
  for (const gd of document.querySelectorAll('.js-plotly-plot')) {
    // A chart being redrawn can lack its data or axes for a moment: skip it rather than fail.
    if (!gd._fullData || !gd.calcdata || !gd._fullLayout || !gd._fullLayout.xaxis || !gd._fullLayout.yaxis
        || !gd._fullLayout.xaxis.l2p) continue;
    const index = gd._fullData.findIndex(trace => trace.name === args.name);
    if (index < 0 || !gd.calcdata[index] || gd.calcdata[index].length <= args.point) continue;
    gd.scrollIntoView({block: 'center'});
    const xaxis = gd._fullLayout.xaxis, yaxis = gd._fullLayout.yaxis;
    const box = gd.getBoundingClientRect();
    for (let i = args.point; i < gd.calcdata[index].length; i++) {
      const point = gd.calcdata[index][i];
      const x = xaxis.l2p(point.x), y = yaxis.l2p(point.y);
      if (args.inside && !(x > 0.1 * xaxis._length && x < 0.9 * xaxis._length && y > 0.1 * yaxis._length
                           && y < 0.9 * yaxis._length)) continue;
      return {x: box.left + xaxis._offset + x, y: box.top + yaxis._offset + y, index: i,
              count: gd.calcdata[index].length};
    }
  }
  return null;
}
"""
HEATMAP_STATE = """
() => {
  // What the weight-map heatmap shows now: its title, grid size, opacity and colour scale.
  for (const gd of document.querySelectorAll('.js-plotly-plot')) {
    const heatmap = (gd._fullData || []).find(trace => trace.type === 'heatmap' && trace.name
                                                       && trace.name.startsWith('weight'));
    if (heatmap && heatmap.z) {
      return JSON.stringify([heatmap.name, heatmap.z.length, heatmap.opacity, heatmap.colorscale]);
    }
  }
  return null;
}
"""
IDLE = "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    log = open(tmp_path / "streamlit.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"streamlit did not start: {(tmp_path / 'streamlit.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def weights_for_test(tmp_path: Path) -> Path | None:
    """$ASFF_VIZ_BROWSER_WEIGHTS when set; None for the embedded default model when installed; else a small
    project checkpoint."""
    from asff_viz.checkpoint import default_checkpoint_path

    if os.environ.get("ASFF_VIZ_BROWSER_WEIGHTS"):
        return Path(os.environ["ASFF_VIZ_BROWSER_WEIGHTS"]).resolve()
    if default_checkpoint_path().is_file():
        return None
    import torch

    from asff_viz import build_model
    from asff_viz.checkpoint import save_checkpoint
    from asff_viz.data.synthetic import CLASS_NAMES
    from asff_viz.engine import initialize_weights, set_objectness_prior

    torch.manual_seed(0)
    model = build_model(width=0.125, depth=0.33, num_classes=8)
    initialize_weights(model)
    set_objectness_prior(model, 1e-6)  # a few dozen boxes at 416 rather than thousands
    path = tmp_path / "small.pt"
    save_checkpoint(path, model, {"class_names": list(CLASS_NAMES), "input_size": 416})
    return path


def wait_idle(page) -> None:
    page.wait_for_timeout(300)  # let a rerun start before waiting for it to end
    page.wait_for_function(IDLE, timeout=WAIT_MS)


def click_point(page, trace_name: str, point: int) -> int:
    """Click a point of a plotly trace (the first one from `point` on that lies well inside the plot).

    Returns the index of the point clicked.
    """
    position = page.evaluate(FIND_TRACE, {"name": trace_name, "point": point, "inside": True})
    assert position is not None, f"no chart with a '{trace_name}' trace with a point inside the plot"
    page.wait_for_timeout(300)  # scrolling settles
    position = page.evaluate(FIND_TRACE, {"name": trace_name, "point": point, "inside": True})
    page.mouse.move(position["x"] - 20, position["y"] - 20)
    page.mouse.move(position["x"], position["y"], steps=4)  # hover first: plotly clicks what it hovers
    page.wait_for_timeout(200)
    page.mouse.click(position["x"], position["y"])
    return position["index"]


def test_upload_overlay_select_and_click_in_chromium(server, tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    shots = Path(os.environ.get("ASFF_VIZ_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    weights = weights_for_test(tmp_path)

    from asff_viz.samples import sample_path

    # A distinctive size, so the page shows when *this* image is the one analysed.
    image = cv2.imread(str(sample_path("shapes_square.jpg")))
    upload = tmp_path / "upload_400x300.png"
    cv2.imwrite(str(upload), cv2.resize(image, (400, 300), interpolation=cv2.INTER_AREA))
    timings = {"weights": "embedded default" if weights is None else str(weights),
               "input_size": 416, "device": "cpu"}

    with playwright_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1500, "height": 1100})
        page = context.new_page()
        try:
            page.goto(server)
            page.get_by_text("Image source").wait_for(timeout=WAIT_MS)
            if weights is not None:
                page.get_by_text("Path", exact=True).click()
                field = page.get_by_role("textbox", name="Checkpoint path on the server")
                field.fill(str(weights))
                field.press("Enter")
            page.wait_for_function("() => document.querySelector('.js-plotly-plot')", timeout=WAIT_MS)
            wait_idle(page)
            page.screenshot(path=shots / "01_start.png")

            # Upload -> first overlay.
            page.get_by_text("Upload", exact=True).first.click()
            page.get_by_text("Upload an image", exact=True).wait_for(timeout=WAIT_MS)
            wait_idle(page)
            chooser = page.locator("input[type=file]").first
            chooser.wait_for(state="attached", timeout=WAIT_MS)
            started = time.perf_counter()
            chooser.set_input_files(str(upload))
            # The overlay of *this* image: a chart with a weight heatmap on axes spanning 400 x 300 pixels.
            page.wait_for_function(
                "() => [...document.querySelectorAll('.js-plotly-plot')].some(gd => gd._fullLayout && "
                "gd._fullLayout.xaxis && gd._fullLayout.yaxis && "
                "(gd._fullData || []).some(trace => trace.type === 'heatmap') && "
                "gd._fullLayout.xaxis.range[1] === 400 && gd._fullLayout.yaxis.range[0] === 300)", timeout=WAIT_MS)
            timings["upload_to_first_overlay_s"] = round(time.perf_counter() - started, 3)
            wait_idle(page)
            page.screenshot(path=shots / "02_uploaded_overlay.png")
            assert not page.locator("[data-testid='stException']").count()

            # View changes redraw from the cached trace: another target level, then another opacity.
            for name, change in (("level_change_to_redraw_s", lambda: page.get_by_role(
                                      "radiogroup", name="Target level").get_by_role("radio", name="L2 · s8").click()),
                                 ("opacity_change_to_redraw_s", lambda: page.get_by_role(
                                      "slider", name="Opacity").first.press("ArrowLeft"))):
                page.evaluate(f"() => {{ window.heatmapBefore = ({HEATMAP_STATE})(); }}")
                started = time.perf_counter()
                change()
                page.wait_for_function(f"() => {{ const now = ({HEATMAP_STATE})(); "
                                       "return now !== null && now !== window.heatmapBefore; }", timeout=WAIT_MS)
                timings[name] = round(time.perf_counter() - started, 3)
                wait_idle(page)
            state = json.loads(page.evaluate(HEATMAP_STATE))
            assert state[1] == 52 and abs(state[2] - 0.55) < 1e-6, state  # 416 / 8 cells; opacity 0.60 - 0.05
            page.screenshot(path=shots / "03_level_and_opacity.png")

            # Click a cell of the weight map: the readout follows.
            x_before = page.get_by_role("spinbutton", name="x (px)").input_value()
            click_point(page, "cells", 5)
            page.wait_for_function(
                f"() => {{ const input = [...document.querySelectorAll('input')].find(i => i.getAttribute('aria-label')"
                f" === 'x (px)'); return input && input.value !== {json.dumps(x_before)}; }}", timeout=WAIT_MS)
            wait_idle(page)
            page.screenshot(path=shots / "04_clicked_cell.png")

            # Select a detection by clicking its box centre.
            page.get_by_role("tab", name="Detections").click()
            page.wait_for_function("() => document.body.innerText.includes('was predicted by') || "
                                   "document.body.innerText.includes('No detections')", timeout=WAIT_MS)
            wait_idle(page)
            found = page.evaluate(FIND_TRACE, {"name": "detections", "point": 1, "inside": True})
            assert found is not None, "no second detection inside the uploaded image to select"
            target = click_point(page, "detections", 1)
            page.wait_for_function(f"() => document.body.innerText.includes('Detection #{target} was predicted')",
                                   timeout=WAIT_MS)
            wait_idle(page)
            page.screenshot(path=shots / "05_selected_detection.png", full_page=True)

            # A second session works on its own image and leaves the first one alone.
            other = context.new_page()
            other.goto(server)
            other.get_by_text("Image source").wait_for(timeout=WAIT_MS)
            if weights is not None:
                other.get_by_text("Path", exact=True).click()
                field = other.get_by_role("textbox", name="Checkpoint path on the server")
                field.fill(str(weights))
                field.press("Enter")
            other.wait_for_function("() => document.querySelector('.js-plotly-plot')", timeout=WAIT_MS)
            wait_idle(other)
            assert "400×300" not in other.inner_text("body")
            page.bring_to_front()
            assert "400×300" in page.inner_text("body")
            other.screenshot(path=shots / "06_second_session.png")
        except BaseException:
            page.screenshot(path=shots / "failure.png", full_page=True)
            raise
        finally:
            context.close()
    (shots / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    print(f"\nbrowser timings: {timings}\nscreenshots: {shots}")
    assert timings["level_change_to_redraw_s"] < 30 and timings["opacity_change_to_redraw_s"] < 30

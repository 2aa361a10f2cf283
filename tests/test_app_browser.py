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
    from asff_viz.training.params import initialize_weights, set_objectness_prior

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


EXPLORER_STATE = """
() => {
  // What the fusion explorer shows now: its map trace (name, rows, opacity, colour scale), the checked controls
  // and the caption.
  const gd = document.getElementById('chart');
  if (!gd || !gd._fullData) return null;
  const map = gd._fullData.find(trace => trace.type === 'heatmap' || trace.type === 'image');
  const checked = id => [...document.querySelectorAll('#' + id + ' button')].map(b => b.getAttribute('aria-checked'))
                                                                         .indexOf('true');
  return JSON.stringify({name: map ? map.name : null, rows: map && map.z ? map.z.length : 0,
                         opacity: map ? map.opacity : null, colorscale: map ? map.colorscale : null,
                         mode: checked('mode'), target: checked('target'), source: checked('source'),
                         caption: document.getElementById('caption').textContent});
}
"""
PAGE_COLORSCALES = """
() => [...document.querySelectorAll('.js-plotly-plot')].flatMap(gd => (gd.data || []).filter(t => t.colorscale)
                                                                     .map(t => t.colorscale))
"""


def explorer_frame(page):
    """The fusion explorer's iframe, once its chart is drawn."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        for frame in page.frames:
            if "fusion_explorer" in frame.url:
                try:
                    if frame.evaluate(EXPLORER_STATE):
                        return frame
                except Exception:  # noqa: BLE001  the frame is still loading
                    pass
        page.wait_for_timeout(100)
    raise AssertionError("the fusion explorer did not draw")


def explorer_state(frame) -> dict:
    return json.loads(frame.evaluate(EXPLORER_STATE))


def timed_change(frame, action: str, condition: str) -> float:
    """Seconds from a control change in the explorer (`action`, JS run in its frame) to the chart showing
    `condition` (a JS expression over `s`, the parsed EXPLORER_STATE), painted: measured in the page, so the
    driver's own latency is not counted."""
    seconds = frame.evaluate(f"""async () => {{
        const read = () => {{ const s = JSON.parse(({EXPLORER_STATE})()); return {condition}; }};
        const started = performance.now();
        {action};
        while (!read()) await new Promise(resolve => requestAnimationFrame(resolve));
        await new Promise(resolve => requestAnimationFrame(resolve));  // the frame that shows it
        return (performance.now() - started) / 1000;
    }}""")
    return round(seconds, 3)


def choose_weights(page, weights) -> None:
    if weights is not None:
        page.get_by_text("Path", exact=True).click()
        field = page.get_by_role("textbox", name="Checkpoint path on the server")
        field.fill(str(weights))
        field.press("Enter")


def upload_image(page, path: Path, width: int, height: int) -> float:
    """Upload `path`; seconds until the explorer draws the weight map of an image of this size."""
    chooser = page.locator("[data-testid='stFileUploaderDropzoneInput']").first
    chooser.wait_for(state="attached", timeout=WAIT_MS)
    started = time.perf_counter()
    chooser.set_input_files(str(path))
    deadline, last = time.monotonic() + WAIT_MS / 1000, None
    while time.monotonic() < deadline:
        for frame in page.frames:
            if "fusion_explorer" in frame.url:
                try:
                    size = frame.evaluate("() => { const gd = document.getElementById('chart'); return gd && "
                                          "gd._fullLayout && gd._fullData && gd._fullData.length ? "
                                          "[gd._fullLayout.xaxis.range[1], gd._fullLayout.yaxis.range[0]] : null; }")
                except Exception:  # noqa: BLE001  a frame being replaced
                    size = None
                if size == [width, height]:
                    return round(time.perf_counter() - started, 3)
                last = size
        page.wait_for_timeout(50)
    raise AssertionError(f"no overlay of the {width}x{height} upload (the chart spans {last})")


def downloads_of(page, shots: Path, prefix: str) -> list[str]:
    """Press every download button on the page; each file must be a valid file of its type."""
    names = []
    for button in page.locator("[data-testid='stDownloadButton'] button").all():
        with page.expect_download(timeout=WAIT_MS) as info:
            button.click()
        download = info.value
        path = shots / f"{prefix}_{download.suggested_filename}"
        download.save_as(path)
        data = path.read_bytes()
        kind = path.suffix
        if kind == ".png":
            assert data.startswith(b"\x89PNG"), path
        elif kind == ".pdf":
            assert data.startswith(b"%PDF") and b"%%EOF" in data[-1024:], path
        elif kind == ".json":
            json.loads(data)
        elif kind == ".csv":
            assert len(data.decode().splitlines()) >= 2, path
        elif kind == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as archive:
                assert archive.files
        else:
            raise AssertionError(f"unexpected download {path}")
        names.append(download.suggested_filename)
    return names


def test_the_app_in_chromium(server, tmp_path):
    """Every tab, every download button, the colour scales as the browser got them, the upload -> change view
    -> upload sequence, two sessions, and the timings (reported in timings.json, not asserted)."""
    playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    from asff_viz.app.charts import plotly_colorscale
    from asff_viz.bench.environment import cpu_model
    from asff_viz.samples import sample_path

    shots = Path(os.environ.get("ASFF_VIZ_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    weights = weights_for_test(tmp_path)
    # Distinctive sizes, so the page shows when *this* image is the one analysed.
    image = cv2.imread(str(sample_path("shapes_square.jpg")))
    uploads = {}
    for name, (width, height) in {"first_400x300.png": (400, 300), "second_360x240.png": (360, 240)}.items():
        uploads[name] = (tmp_path / name, width, height)
        cv2.imwrite(str(tmp_path / name), cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))
    timings = {"weights": "embedded default" if weights is None else str(weights), "input_size": 416,
               "device": "cpu", "cpu": cpu_model()}
    downloads = {}

    with playwright_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1500, "height": 1100}, accept_downloads=True)
        page = context.new_page()
        try:
            page.goto(server)
            page.get_by_text("Image source").wait_for(timeout=WAIT_MS)
            choose_weights(page, weights)
            frame = explorer_frame(page)
            wait_idle(page)
            page.screenshot(path=shots / "01_start.png")

            # Upload -> first overlay.
            page.get_by_text("Upload", exact=True).first.click()
            page.get_by_text("Upload an image", exact=True).wait_for(timeout=WAIT_MS)
            wait_idle(page)
            path, width, height = uploads["first_400x300.png"]
            timings["upload_to_first_overlay_s"] = upload_image(page, path, width, height)
            wait_idle(page)
            frame = explorer_frame(page)
            page.screenshot(path=shots / "02_uploaded_overlay.png")
            assert not page.locator("[data-testid='stException']").count()

            # Level, source, opacity and colormap switch in the browser.
            timings["level_change_s"] = timed_change(
                frame, "document.querySelectorAll('#target button')[2].click()", "s.target === 2 && s.rows === 52")
            timings["source_change_s"] = timed_change(
                frame, "document.querySelectorAll('#source button')[2].click()", "s.source === 2")
            timings["opacity_change_s"] = timed_change(
                frame, "const o = document.getElementById('opacity'); o.value = '0.35'; "
                       "o.dispatchEvent(new Event('input')); o.dispatchEvent(new Event('change'))",
                "Math.abs(s.opacity - 0.35) < 1e-9")
            timings["colormap_change_s"] = timed_change(
                frame, "const c = document.getElementById('colormap'); c.value = 'magma'; "
                       "c.dispatchEvent(new Event('change'))", "s.colorscale && s.colorscale[0][1] === '#010004'")
            wait_idle(page)
            # The colour scale as the chart received it: magma's zero is black, not a theme colour.
            assert explorer_state(frame)["colorscale"] == plotly_colorscale("magma")
            page.screenshot(path=shots / "03_level_source_opacity_colormap.png")

            # Click a cell of the weight map: the readout follows.
            x_before = page.get_by_role("spinbutton", name="x (px)").input_value()
            position = frame.evaluate(FIND_TRACE, {"name": "cells", "point": 40, "inside": True})
            frame_box = page.locator("iframe[title*='fusion_explorer']").bounding_box()
            page.mouse.move(frame_box["x"] + position["x"], frame_box["y"] + position["y"], steps=4)
            page.wait_for_timeout(200)
            page.mouse.click(frame_box["x"] + position["x"], frame_box["y"] + position["y"])
            page.wait_for_function(
                f"() => {{ const input = [...document.querySelectorAll('input')].find(i => i.getAttribute('aria-label')"
                f" === 'x (px)'); return input && input.value !== {json.dumps(x_before)}; }}", timeout=WAIT_MS)
            wait_idle(page)
            page.screenshot(path=shots / "04_clicked_cell.png")

            # The audit's sequence: another view and level, then an image the app has not seen.
            frame.locator("#mode button").nth(2).click()  # Entropy
            frame.locator("#target button").nth(2).click()  # L2
            wait_idle(page)
            path, width, height = uploads["second_360x240.png"]
            upload_image(page, path, width, height)
            wait_idle(page)
            frame = explorer_frame(page)
            state = explorer_state(frame)
            assert (state["mode"], state["target"]) == (2, 2), state  # the controls show Entropy at L2 ...
            # ... and so does the chart
            assert state["name"] == "weight map" and "Normalised entropy" in state["caption"], state
            assert "L2" in state["caption"], state
            downloads["fusion"] = downloads_of(page, shots, "fusion")
            page.screenshot(path=shots / "05_second_upload_keeps_the_view.png")

            # Detections: select one by clicking its box centre.
            page.get_by_role("tab", name="Detections").click()
            page.wait_for_function("() => document.body.innerText.includes('was predicted by') || "
                                   "document.body.innerText.includes('No detections')", timeout=WAIT_MS)
            wait_idle(page)
            if page.evaluate(FIND_TRACE, {"name": "detections", "point": 1, "inside": True}) is not None:
                target = click_point(page, "detections", 1)
                page.wait_for_function(f"() => document.body.innerText.includes('Detection #{target} was predicted')",
                                       timeout=WAIT_MS)
                wait_idle(page)
            downloads["detections"] = downloads_of(page, shots, "detections")
            page.get_by_text("Zoomed crop with the maps").scroll_into_view_if_needed()
            page.screenshot(path=shots / "06_detections_crop.png")

            # Gradient flow: computed when asked, with a progress indication.
            page.get_by_role("tab", name="Gradient flow").click()
            button = page.get_by_role("button", name="Compute the gradient flow")
            button.wait_for(timeout=WAIT_MS)
            started = time.perf_counter()
            button.click()
            page.get_by_text("Conflict rate").first.wait_for(timeout=WAIT_MS * 3)
            timings["gradient_flow_s"] = round(time.perf_counter() - started, 3)
            wait_idle(page)
            received = page.evaluate(PAGE_COLORSCALES)
            assert received and all(scale[0][1] != "#ab63fa" for scale in received), received
            assert any(scale == plotly_colorscale("magma") for scale in received), received
            downloads["gradient"] = downloads_of(page, shots, "gradient")
            page.get_by_text("Conflict rate").first.scroll_into_view_if_needed()
            page.screenshot(path=shots / "07_gradient_flow.png")
            page.get_by_text("Where the gradient goes").scroll_into_view_if_needed()
            page.screenshot(path=shots / "07b_gradient_maps.png")

            for index, tab in enumerate(("Counterfactuals", "Compare checkpoints")):
                page.get_by_role("tab", name=tab).click()
                page.wait_for_timeout(500)
                wait_idle(page)
                assert not page.locator("[data-testid='stException']").count(), tab
                downloads[tab] = downloads_of(page, shots, tab.split()[0].lower())
                page.screenshot(path=shots / f"{8 + index:02d}_{tab.split()[0].lower()}.png", full_page=True)

            # A second session works on its own image and leaves the first one alone.
            other = context.new_page()
            other.goto(server)
            other.get_by_text("Image source").wait_for(timeout=WAIT_MS)
            choose_weights(other, weights)
            explorer_frame(other)
            wait_idle(other)
            assert "360×240" not in other.inner_text("body")
            page.bring_to_front()
            assert "360×240" in page.inner_text("body")
            other.screenshot(path=shots / "10_second_session.png")

            # Across images: scale-stats over the bundled samples; a per-image dot opens that image.
            page.get_by_role("tab", name="Across images").click()
            page.wait_for_function("() => document.body.innerText.includes('objects by size')", timeout=WAIT_MS)
            wait_idle(page)
            page.screenshot(path=shots / "11_across_images.png")
            downloads["across"] = downloads_of(page, shots, "across")
            position = page.evaluate(FIND_TRACE, {"name": "images", "point": 0, "inside": False})
            assert position is not None, "no per-image dots"
            page.mouse.move(position["x"] - 10, position["y"] - 10)
            page.mouse.move(position["x"], position["y"], steps=4)
            page.wait_for_timeout(200)
            page.mouse.click(position["x"], position["y"])
            page.wait_for_function("() => !document.body.innerText.includes('360×240')", timeout=WAIT_MS)
            wait_idle(page)
            assert page.get_by_role("tab", name="Fusion weights").get_attribute("aria-selected") == "true"
            explorer_frame(page)
            page.screenshot(path=shots / "12_opened_from_across_images.png")
        except BaseException:
            page.screenshot(path=shots / "failure.png", full_page=True)
            raise
        finally:
            context.close()
    timings["downloads"] = downloads
    (shots / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    print(f"\nbrowser timings: {timings}\nscreenshots: {shots}")
    assert {"trace.npz", "detections.json"} <= set(downloads["fusion"])
    assert {"gradient_flow.png", "gradient_flow.pdf", "gradient_flow.json"} <= set(downloads["gradient"])
    assert {"fusion_by_size_objects.csv", "fusion_by_size.csv"} <= set(downloads["across"])

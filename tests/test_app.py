"""The Streamlit app, driven headlessly by `streamlit.testing.v1.AppTest`.

Tiny random-weight checkpoints (width 0.125, 8 classes, input 128) keep every run short; one test starts the
app on the embedded default model when it is installed. Each test clears Streamlit's caches first, since
AppTest runs the script in this process and caches are per process.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from asff_viz import build_model
from asff_viz.app.inputs import store_upload
from asff_viz.checkpoint import save_checkpoint
from asff_viz.data.synthetic import CLASS_NAMES
from asff_viz.samples import sample_path
from asff_viz.training.params import initialize_weights, set_objectness_prior

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TIMEOUT = 120


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Small checkpoints: ASFF, sum fusion, another class count, MobileNetV2 ASFF and baseline, and metadata naming
    the wrong class count.

    The official initialization with a low objectness prior gives a few dozen detections at 0.25 on the
    samples (PyTorch's default initialization saturates every score at one value).
    """
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    paths = {}
    for name, fusion, classes in (("asff", "asff", 8), ("sum", "sum", 8), ("three_classes", "asff", 3),
                                  ("weighted", "weighted", 8)):
        model = build_model(width=0.125, depth=0.33, num_classes=classes, fusion=fusion)
        initialize_weights(model)
        set_objectness_prior(model, 0.001)
        names = list(CLASS_NAMES) if classes == 8 else ["a", "b", "c"]
        paths[name] = folder / f"{name}.pt"
        save_checkpoint(paths[name], model, {"class_names": names, "input_size": 128})
    for fusion in ("asff", "baseline"):  # the MobileNetV2 family
        model = build_model(backbone="mobilenet_v2", width=0.25, depth=0.33, num_classes=8, fusion=fusion)
        initialize_weights(model)
        set_objectness_prior(model, 0.001)
        paths[f"mobile_{fusion}"] = folder / f"mobile_{fusion}.pt"
        save_checkpoint(paths[f"mobile_{fusion}"], model, {"class_names": list(CLASS_NAMES), "input_size": 128})
    model = build_model(width=0.125, depth=0.33, num_classes=3)
    paths["wrong_metadata"] = folder / "wrong_metadata.pt"
    save_checkpoint(paths["wrong_metadata"], model, {"class_names": list(CLASS_NAMES), "input_size": 128})
    return paths


@pytest.fixture(autouse=True)
def _server_root(tmp_path_factory, monkeypatch):
    """Server paths are read only under $ASFF_VIZ_SERVER_ROOT: here, the tests' temporary folder."""
    monkeypatch.setenv("ASFF_VIZ_SERVER_ROOT", str(tmp_path_factory.getbasetemp()))


@pytest.fixture(autouse=True)
def _fresh_caches():
    st.cache_data.clear()
    st.cache_resource.clear()
    yield


def start(weights_path: Path | None, **state) -> AppTest:
    """An AppTest of app.py on `weights_path` (by server path) at input 128, run once."""
    app = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if weights_path is not None:
        app.session_state["weights_source"] = "Path"
        app.session_state["weights_path"] = str(weights_path)
    app.session_state["input_size"] = 128
    for key, value in state.items():
        app.session_state[key] = value
    app.run()
    return app


def assert_healthy(app: AppTest) -> None:
    assert not app.exception, [exception.value for exception in app.exception]
    assert not app.error, [error.value for error in app.error]


def metric(app: AppTest, label: str) -> str:
    return next(m.value for m in app.metric if m.label == label)


def open_view(app: AppTest, view: str) -> AppTest:
    app.session_state["view"] = view
    app.run()
    return app


def explore(app: AppTest, click: dict | None = None, **changes) -> AppTest:
    """Report a change from the fusion explorer (the browser component) as the browser would, and rerun."""
    from asff_viz.app.explorer import FusionState

    keys = FusionState.SESSION_KEYS
    state = {name: app.session_state[key] for name, key in keys.items() if key in app.session_state}
    value = {**state, **changes, "seq": int(state.get("seq", 0)) + 1}
    if click is not None:
        explore.clicks = getattr(explore, "clicks", 0) + 1
        value["click"] = {"id": f"test-{explore.clicks}", **click}
    app.session_state["fusion_explorer"] = value
    app.run()
    return app


def compute_gradient_flow(app: AppTest) -> AppTest:
    """Press the gradient-flow view's button (it computes only when asked) if this objective still needs it."""
    buttons = [button for button in app.button if button.key == "compute_gradient_flow"]
    if buttons:
        buttons[0].click().run()
    return app


def encode(image: np.ndarray, suffix: str, params: list | None = None) -> bytes:
    ok, data = cv2.imencode(suffix, image, params or [])
    assert ok
    return data.tobytes()


# --------------------------------------------------------------------------------------------------- tests


def test_starts_on_the_embedded_default_with_a_sample():
    app = AppTest.from_file(APP, default_timeout=TIMEOUT)
    app.run()
    assert_healthy(app)
    assert app.radio(key="weights_source").value == "Embedded default"
    assert app.radio(key="image_source").value == "Sample"
    assert int(metric(app, "Detections")) > 0, "the default model finds nothing on its own sample"
    assert app.get("plotly_chart"), "no overlay chart drawn"


def test_views_and_controls_never_rerun_the_model_for_a_view_change(weights, monkeypatch):
    import asff_viz.introspection as introspection

    calls = []
    original = introspection.trace_image

    def counting(*args, **kwargs):
        calls.append(kwargs.get("counterfactual"))
        return original(*args, **kwargs)

    monkeypatch.setattr(introspection, "trace_image", counting)
    app = start(weights["asff"])
    assert_healthy(app)
    assert len(calls) == 1
    assert int(metric(app, "Detections")) > 0

    # Every fusion view and control (switched in the browser, reported back): the model never runs again.
    for mode in ("RGB composite", "Entropy", "Figure 3 grid", "Overlay"):
        explore(app, mode=mode)
        assert_healthy(app)
        assert app.session_state["fusion_mode"] == mode
    explore(app, target=2, source=1, opacity=0.3, colormap="magma", show_boxes=False)
    assert_healthy(app)
    assert (app.session_state["fusion_target"], app.session_state["fusion_source"], app.session_state["fusion_opacity"],
            app.session_state["fusion_colormap"], app.session_state["fusion_boxes"]) == (2, 1, 0.3, "magma", False)
    explore(app, click={"x": 40.5, "y": 30.5})
    assert app.session_state["picked_point"] == (40.5, 30.5)
    explore(app, click={"detection": 1})
    assert app.session_state["selected_detection"] == 1
    explore(app)  # the same report again: the click is not handled twice
    app.session_state["selected_detection"] = 0
    app.run()
    assert app.session_state["selected_detection"] == 0
    app.number_input(key="pick_x").set_value(5).run()
    app.number_input(key="pick_y").set_value(100).run()
    assert_healthy(app)
    assert app.session_state["picked_point"] == (5.5, 100.5)
    assert len(calls) == 1, "a view change re-ran the model"

    # Detections: pick one from the selectbox; attributions on demand.
    open_view(app, "Detections")
    assert_healthy(app)
    app.selectbox(key="detection_picker").set_value(1).run()
    assert app.session_state["selected_detection"] == 1
    assert any("Detection **#1** was predicted by" in markdown.value for markdown in app.markdown)
    app.multiselect(key="attribution_methods").set_value(["saliency", "grad_cam", "integrated_gradients"]).run()
    app.select_slider(key="attribution_steps").set_value(4).run()
    app.button(key="compute_attributions").click().run()
    assert_healthy(app)
    assert sum(1 for chart in app.get("plotly_chart") if "attribution_" in str(chart.proto.id)) >= 5
    assert len(calls) == 1

    # Gradient flow, for each objective (the bundled samples have annotations for the loss).
    open_view(app, "Gradient flow")
    assert_healthy(app)
    for objective in ("sum", "loss", "score"):
        app.radio(key="gradient_objective").set_value(objective).run()
        compute_gradient_flow(app)
        assert_healthy(app)
        # This untrained model's loss overflows (NaN gradient with the learned weights): said, never a rate of 0 %.
        warnings = [w.value for w in app.warning]
        assert all("is not finite" in w for w in warnings), warnings
        not_finite = sum(f"{name} weights" in " ".join(warnings) for name in ("learned", "uniform"))
        # A detection's score reaches only its own target level: nothing can conflict, and 0 % would mislead.
        expected_na = 2 if objective == "score" else not_finite
        rates = [m.value for m in app.metric if m.label == "Conflict rate"]
        assert len(rates) == 2 and rates.count("n/a") == expected_na, rates
        assert all(rate == "n/a" or rate.endswith("%") for rate in rates)
    app.segmented_control(key="gradient_source").set_value(2).run()
    assert_healthy(app)

    # Counterfactuals: uniform, force one level, drop one level at one target level.
    open_view(app, "Counterfactuals")
    assert_healthy(app)
    assert app.segmented_control(key="counterfactual_source").disabled  # uniform weights have no source level
    app.segmented_control(key="counterfactual_kind").set_value("one_hot").run()
    assert not app.segmented_control(key="counterfactual_source").disabled
    app.segmented_control(key="counterfactual_source").set_value(0).run()
    assert_healthy(app)
    app.segmented_control(key="counterfactual_kind").set_value("drop").run()
    app.pills(key="counterfactual_levels").set_value([1]).run()
    assert_healthy(app)
    kinds = [getattr(c, "kind", None) for c in calls[1:]]
    assert {"uniform", "one_hot", "drop"} <= set(kinds)
    assert {metric(app, name) is not None for name in ("Kept", "Lost", "New")}

    # Compare with a sum-fusion checkpoint (no fusion weights: detections only for it).
    open_view(app, "Compare checkpoints")
    app.radio(key="compare_weights_source").set_value("Path").run()
    app.text_input(key="compare_weights_path").set_value(str(weights["sum"])).run()
    assert_healthy(app)
    assert any("no learned weights" in info.value for info in app.info)
    assert any(m.label == "In both" for m in app.metric)


def test_every_download_is_offered(weights):
    app = start(weights["asff"])
    labels = {button.label for button in app.get("download_button")}
    assert {"Figure PNG", "Figure PDF", "Trace .npz", "Detections JSON"} <= labels


def make_uploads() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """name -> (file bytes, expected (height, width) after decoding)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colour = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
    gray16 = (rng.integers(0, 65535, (48, 80), dtype=np.uint16))
    rgba = np.dstack([colour, np.full((48, 80), 128, np.uint8)])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    jpeg_with_exif = io.BytesIO()
    Image.fromarray(colour).save(jpeg_with_exif, "JPEG", exif=exif.tobytes())
    webp = io.BytesIO()
    Image.fromarray(colour).save(webp, "WEBP")
    return {
        "photo.jpg": (jpeg_with_exif.getvalue(), (80, 48)),
        "gray16.png": (encode(gray16, ".png"), (48, 80)),
        "alpha.png": (encode(rgba, ".png"), (48, 80)),
        "picture.bmp": (encode(colour, ".bmp"), (48, 80)),
        "picture.webp": (webp.getvalue(), (48, 80)),
        "scan.tiff": (encode(colour, ".tiff"), (48, 80)),
    }


def test_good_uploads_in_every_format(weights):
    app = start(weights["asff"], image_source="Upload")
    assert_healthy(app)
    assert any("Upload an image" in info.value for info in app.info)
    for name, (data, (height, width)) in make_uploads().items():
        app.file_uploader(key="image_upload").set_value((name, data, "application/octet-stream")).run()
        assert_healthy(app)
        assert metric(app, "Image") == f"{width}×{height}", name


def test_bad_uploads_give_a_message_and_the_app_keeps_working(weights):
    good = encode(np.full((40, 60, 3), 90, np.uint8), ".png")
    huge = encode(np.zeros((8100, 8000), np.uint8), ".png")  # 64.8 MP: over the 64 MP limit
    bad = {
        "truncated.jpg": encode(np.full((40, 60, 3), 90, np.uint8), ".jpg")[:100],
        "notes.png": b"these are notes, not pixels",
        "empty.png": b"",
        "huge.png": huge,
    }
    app = start(weights["asff"], image_source="Upload")
    for name, data in bad.items():
        app.file_uploader(key="image_upload").set_value((name, data, "image/png")).run()
        assert not app.exception, [e.value for e in app.exception]
        assert app.error and name in app.error[0].value, (name, [e.value for e in app.error])
        assert not app.get("plotly_chart")
        app.file_uploader(key="image_upload").set_value(("good.png", good, "image/png")).run()
        assert_healthy(app)
        assert metric(app, "Image") == "60×40"


class _Reducer:
    """Unpickling this would create a file: `weights_only` loading must refuse it before it runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_bad_checkpoints_give_a_message_and_the_app_keeps_working(weights, tmp_path):
    marker = tmp_path / "code_ran"
    malicious = io.BytesIO()
    torch.save({"model": _Reducer(marker)}, malicious)
    uploads = {
        "random.pt": (np.random.default_rng(0).bytes(2048), "random.pt"),
        "malicious.pt": (malicious.getvalue(), "malicious.pt: refused"),
        "wrong_metadata.pt": (weights["wrong_metadata"].read_bytes(), "classes"),
        "empty.pth": (b"", "empty"),
    }
    app = start(weights["asff"])
    for name, (data, message) in uploads.items():
        app.radio(key="weights_source").set_value("Upload").run()
        app.file_uploader(key="weights_upload").set_value((name, data, "application/octet-stream")).run()
        assert not app.exception, [e.value for e in app.exception]
        assert app.error and message in app.error[0].value, (name, [e.value for e in app.error])
        app.radio(key="weights_source").set_value("Path").run()
        assert_healthy(app)
        assert app.get("plotly_chart")
    assert not marker.exists(), "loading a checkpoint ran code from its pickle"
    app.text_input(key="weights_path").set_value(str(tmp_path / "missing.pt")).run()
    assert app.error and "no such checkpoint" in app.error[0].value


def test_a_model_with_another_class_count(weights):
    app = start(weights["three_classes"])
    assert_healthy(app)
    open_view(app, "Gradient flow")
    app.radio(key="gradient_objective").set_value("loss").run()
    assert not app.exception
    assert any("classes" in warning.value for warning in app.warning), "no message about the class mismatch"


def test_a_model_without_fusion_weights_shows_its_detections(weights):
    app = start(weights["sum"])
    assert not app.exception
    assert any("without learned weights" in warning.value for warning in app.warning)
    assert [tab.label for tab in app.tabs] == ["Detections", "Compare checkpoints"]
    assert app.get("plotly_chart")


def test_sessions_share_the_model_and_do_not_interfere(weights):
    from asff_viz.app import cached
    from asff_viz.introspection.capture import hook_count

    first = start(weights["asff"], sample_name="shapes_wide.jpg")
    second = start(weights["asff"], sample_name="shapes_tall.jpg", conf_threshold=0.05)
    explore(first, opacity=0.2)
    assert_healthy(first)
    assert_healthy(second)
    for app, name in ((first, "shapes_wide.jpg"), (second, "shapes_tall.jpg")):
        height, width = cv2.imread(str(sample_path(name))).shape[:2]
        assert metric(app, "Image") == f"{width}×{height}"
    assert first.session_state["fusion_opacity"] == 0.2
    assert second.session_state["fusion_opacity"] == 0.6, "one session's control moved the other's"
    model = cached.model(str(weights["asff"].resolve()), cached.file_sha256(
        str(weights["asff"].resolve()), weights["asff"].stat().st_mtime_ns, weights["asff"].stat().st_size), "cpu")
    assert hook_count(model) == 0, "a hook stayed on the shared model"
    assert set(vars(model)) - {"training", "config", "num_classes", "strides", "metadata"} <= {
        name for name in vars(model) if name.startswith("_")}, "per-session state on the shared model"


def test_ground_truth_upload_enables_the_loss_objective(weights):
    import json

    image = encode(np.full((96, 128, 3), 80, np.uint8), ".png")
    document = {"images": [{"id": 7, "file_name": "scene.png", "width": 128, "height": 96}],
                "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
                "annotations": [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [10, 20, 40, 30], "iscrowd": 0}]}
    app = start(weights["asff"], image_source="Upload", view="Gradient flow", gradient_objective="loss")
    app.file_uploader(key="image_upload").set_value(("scene.png", image, "image/png")).run()
    app.file_uploader(key="annotations_upload").set_value(
        ("scene.json", json.dumps(document).encode(), "application/json")).run()
    compute_gradient_flow(app)
    assert_healthy(app)
    assert any("Ground truth: 1 boxes" in caption.value for caption in app.caption)
    assert any(m.label == "Conflict rate" for m in app.metric), "the loss objective did not run"
    app.file_uploader(key="annotations_upload").set_value(("broken.json", b"{not json", "application/json")).run()
    assert not app.exception
    assert app.error and "broken.json" in app.error[0].value


def test_downloads_are_valid_files(weights, tmp_path):
    import json
    from types import SimpleNamespace

    from asff_viz import load_model
    from asff_viz.app import cached
    from asff_viz.app.views.fusion import VIEWS, static_figure
    from asff_viz.introspection import Trace, trace_image

    model = load_model(weights["asff"])
    trace = trace_image(model, str(sample_path("shapes_square.jpg")), size=128, conf_threshold=0.25)
    analysis = SimpleNamespace(trace=trace, records=list(trace.detections))
    for mode in VIEWS:
        figure = static_figure(analysis, mode, 1, 0, 0.5, "magma")
        assert cached.figure_bytes(figure, "png").startswith(b"\x89PNG"), mode
        assert cached.figure_bytes(static_figure(analysis, mode, 2, 1, 0.5, "viridis"), "pdf").startswith(b"%PDF")
    path = tmp_path / "trace.npz"
    path.write_bytes(cached.trace_npz_bytes(trace))
    loaded = Trace.load(path)
    assert len(loaded.detections) == len(trace.detections)
    np.testing.assert_array_equal(loaded.fusion_weights[2], trace.fusion_weights[2])
    document = json.loads(cached.detections_json(trace, "shapes_square.jpg"))
    assert len(document["detections"]) == len(trace.detections) > 0
    first = document["detections"][0]
    assert set(first) >= {"box_xyxy", "score", "class_name", "level", "slot", "row", "col", "fusion_weights_here"}
    assert abs(sum(first["fusion_weights_here"]) - 1) < 1e-3


def test_diff_detections_pairs_boxes_by_overlap_and_class():
    from types import SimpleNamespace

    from asff_viz.ops.matching import diff_detections

    def record(box, label, score):
        return SimpleNamespace(box_xyxy=np.array(box, dtype=np.float64), label=label, score=score)

    learned = [record([0, 0, 10, 10], 0, 0.9), record([20, 20, 30, 30], 1, 0.8), record([50, 50, 60, 60], 2, 0.7)]
    other = [record([21, 21, 31, 31], 0, 0.6), record([0, 0, 10, 11], 0, 0.5), record([80, 80, 90, 90], 2, 0.4)]
    changes = {(c.status, c.reference, c.other) for c in diff_detections(learned, other)}
    assert changes == {("kept", 0, 1), ("relabelled", 1, 0), ("lost", 2, None), ("new", None, 2)}
    assert [c.status for c in diff_detections([], other)] == ["new"] * 3


def test_bundled_samples_are_small_and_annotated():
    from asff_viz.inference.transforms import read_image
    from asff_viz.samples import SAMPLES_DIR, list_samples, sample_annotations

    names = list_samples()
    assert len(names) >= 3
    assert sum(path.stat().st_size for path in SAMPLES_DIR.iterdir() if path.suffix in (".jpg", ".json")) < 200_000
    for name in names:
        image = read_image(sample_path(name))
        annotations = sample_annotations(name)
        assert annotations is not None and len(annotations.class_indices) > 0, name
        boxes = annotations.boxes_xyxy
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= image.shape[1]).all() and (
            boxes[:, 3] <= image.shape[0]).all(), name
        assert annotations.class_names == tuple(CLASS_NAMES)


def test_uploaded_checkpoints_are_stored_once_and_pruned(tmp_path):
    folder = tmp_path / "uploads"
    paths = []
    for index in range(5):
        paths.append(store_upload(folder, bytes([index]) * 10, f"digest{index}", ".pt", keep=3))
        os.utime(paths[-1], (1000 + index, 1000 + index))  # distinct, increasing use times
    assert sorted(p.name for p in folder.iterdir()) == ["digest2.pt", "digest3.pt", "digest4.pt"]
    # Using an old upload again makes it the newest, and its bytes are not written twice.
    again = store_upload(folder, b"ignored", "digest2", ".pt", keep=3)
    assert again.read_bytes() == bytes([2]) * 10
    store_upload(folder, b"new", "digest5", ".pt", keep=3)
    assert sorted(p.name for p in folder.iterdir()) == ["digest2.pt", "digest4.pt", "digest5.pt"]


# ------------------------------------------------------------------------------- the audit's defects


def check_download(name: str, data: bytes | str, mime: str) -> None:
    """The bytes are a valid file of the promised type."""
    import csv
    import json

    raw = data.encode() if isinstance(data, str) else bytes(data)
    assert raw, f"{name}: empty"
    if mime == "image/png":
        assert raw.startswith(b"\x89PNG") and cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR) is not None
    elif mime == "application/pdf":
        assert raw.startswith(b"%PDF") and b"%%EOF" in raw[-1024:], name
    elif mime == "application/json":
        json.loads(raw)
    elif mime == "text/csv":
        rows = list(csv.reader(io.StringIO(raw.decode())))
        assert len(rows) >= 2, name
    elif name.endswith(".npz"):
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            assert archive.files, name
    else:
        raise AssertionError(f"{name}: no check for {mime}")


def produce_downloads(app: AppTest) -> dict[str, tuple]:
    offered = dict(app.session_state["offered_downloads"]) if "offered_downloads" in app.session_state else {}
    app.session_state["offered_downloads"] = {}
    return offered


@pytest.mark.parametrize("model", ["asff", "sum", "default"])
def test_every_download_of_every_view_is_a_valid_file(weights, model):
    from asff_viz.analyze.sources import file_sha256
    from asff_viz.checkpoint import default_checkpoint_path

    if model == "default":
        if not default_checkpoint_path().is_file():
            pytest.skip("the embedded default model is not installed")
    app = start(weights[model] if model != "default" else None)
    assert_healthy(app)
    produced = produce_downloads(app)
    for view in [tab.label for tab in app.tabs]:
        open_view(app, view)
        if view == "Gradient flow":
            compute_gradient_flow(app)
        if view == "Detections" and model != "sum":
            app.multiselect(key="attribution_methods").set_value(["saliency"]).run()
            app.button(key="compute_attributions").click().run()
        if view == "Compare checkpoints":
            app.radio(key="compare_weights_source").set_value("Path").run()
            other = weights["asff" if model == "sum" else "sum"]  # the default is compared with a sum model
            app.text_input(key="compare_weights_path").set_value(str(other)).run()
        assert_healthy(app)
        produced.update(produce_downloads(app))
    expected = ({"fusion_download/trace.npz", "fusion_download/detections.json", "gradient_download/gradient_flow.png",
                 "gradient_download/gradient_flow.pdf", "gradient_download/gradient_flow.json"}
                if model != "sum" else {"plain_download/detections.json"})
    assert expected <= set(produced), sorted(produced)
    if model != "sum":  # every view's row: fusion, detections (+ attributions), gradient flow, counterfactuals
        prefixes = {name.split("/")[0] for name in produced}
        assert {"fusion_download", "detection_download", "attribution_download", "gradient_download",
                "counterfactual_download"} <= prefixes, sorted(prefixes)
    for name, (data, mime) in produced.items():
        check_download(name, data() if callable(data) else data, mime)
    # The Compare view's downloads: both checkpoints by sha256, their detections and how they match.
    assert {"compare_download/comparison.json", "compare_download/comparison.png",
            "compare_download/comparison.pdf"} <= set(produced), sorted(produced)
    data = produced["compare_download/comparison.json"][0]
    document = json.loads(data() if callable(data) else data)
    first = weights[model] if model != "default" else default_checkpoint_path()
    other = weights["asff" if model == "sum" else "sum"]
    assert [m["sha256"] for m in document["models"]] == [file_sha256(first), file_sha256(other)]
    assert [m["fusion"] for m in document["models"]] == (["sum", "asff"] if model == "sum" else ["asff", "sum"])
    matches, counts = document["matches"], document["counts"]
    assert sum(counts.values()) == len(matches) and counts == {
        status: sum(1 for m in matches if m["status"] == status) for status in ("kept", "relabelled", "lost", "new")}
    listed = [len(m["detections"]) for m in document["models"]]
    assert sorted(m["a"] for m in matches if m["a"] is not None) == list(range(listed[0]))
    assert sorted(m["b"] for m in matches if m["b"] is not None) == list(range(listed[1]))
    assert all(m["iou"] >= 0.5 for m in matches if m["status"] in ("kept", "relabelled"))


def test_colour_scales_avoid_streamlit_placeholder_colours():
    from asff_viz.app.charts import COLORMAPS, plotly_colorscale

    for name in COLORMAPS:
        for _, colour in plotly_colorscale(name):
            value = int(colour[1:], 16)
            assert not 0x000001 <= value <= 0x000040, (name, colour)
    assert plotly_colorscale("magma")[0][1] == "#010004"  # magma's zero, one red step up: still black


def test_fusion_exports_show_what_the_screen_shows(weights):
    from types import SimpleNamespace

    from matplotlib.patches import Rectangle

    from asff_viz import load_model
    from asff_viz.app.views.fusion import static_figure
    from asff_viz.introspection import trace_image

    model = load_model(weights["asff"])
    trace = trace_image(model, str(sample_path("shapes_square.jpg")), size=128, conf_threshold=0.25)
    records = list(trace.detections[:12])
    assert len({r.level for r in records}) > 1, "the test needs detections of several levels"
    analysis = SimpleNamespace(trace=trace, records=records)

    def boxes(figure):
        return sum(isinstance(p, Rectangle) and not p.get_fill() for ax in figure.axes for p in ax.patches)

    for mode in ("Overlay", "RGB composite", "Entropy"):
        assert boxes(static_figure(analysis, mode, 1, 0, 0.5, "viridis", show_boxes=True)) == len(records), mode
        assert boxes(static_figure(analysis, mode, 1, 0, 0.5, "viridis", show_boxes=False)) == 0, mode


def test_large_images_export_downscaled_with_the_scale_stated(weights):
    from types import SimpleNamespace

    from asff_viz import load_model
    from asff_viz.app.views.fusion import static_figure
    from asff_viz.introspection import trace_image

    model = load_model(weights["asff"])
    big = cv2.resize(cv2.imread(str(sample_path("shapes_square.jpg")))[:, :, ::-1], (4200, 3000))
    trace = trace_image(model, big, size=128, conf_threshold=0.25)
    figure = static_figure(SimpleNamespace(trace=trace, records=list(trace.detections)), "Overlay", 1, 0, 0.5,
                           "viridis")
    image = figure.axes[0].images[0].get_array()
    assert max(image.shape[:2]) == 2048
    assert any("1/2.1 of its 4200x3000 px" in text.get_text() for text in figure.texts)


def test_labels_stay_inside_the_image():
    from types import SimpleNamespace

    from matplotlib.figure import Figure

    from asff_viz.figures.traces import draw_detections_on

    figure = Figure(figsize=(4, 3))
    ax = figure.add_subplot()
    ax.imshow(np.zeros((300, 400, 3), np.uint8), extent=(0, 400, 300, 0))
    record = SimpleNamespace(box_xyxy=np.array([330.0, 100, 398, 150]), score=0.9, label=0,
                             class_name="a long class name", level=1)
    draw_detections_on(ax, [record], image_shape=(300, 400, 3))
    text = ax.texts[0]
    assert text.get_horizontalalignment() == "right" and text.get_position()[0] <= 400


def test_server_paths_stay_inside_the_allowed_folder(weights, monkeypatch, tmp_path):
    monkeypatch.setenv("ASFF_VIZ_SERVER_ROOT", str(tmp_path))
    app = start(None, image_source="Server path")
    app.text_input(key="image_path").set_value("/etc/passwd").run()
    assert not app.exception
    assert app.error and "outside" in app.error[0].value and str(tmp_path) in app.error[0].value
    app.text_input(key="image_path").set_value("../../etc/hostname").run()
    assert app.error and "outside" in app.error[0].value
    image = tmp_path / "inside.png"
    cv2.imwrite(str(image), np.full((64, 80, 3), 90, np.uint8))
    app.text_input(key="image_path").set_value("inside.png").run()
    assert_healthy(app)


def test_the_app_listens_on_this_machine_only_by_default():
    config = (Path(APP).parent / ".streamlit" / "config.toml").read_text()
    assert 'address = "127.0.0.1"' in config and 'fileWatcherType = "none"' in config
    makefile = (Path(APP).parent / "Makefile").read_text()
    assert "ADDRESS ?= 127.0.0.1" in makefile and "--server.address $(ADDRESS)" in makefile


def test_an_older_report_from_the_browser_does_not_undo_a_newer_state(weights):
    from asff_viz.app.explorer import FusionState

    app = start(weights["asff"])
    explore(app, mode="Entropy", target=2)
    seq = app.session_state["fusion_seq"]
    app.session_state["fusion_explorer"] = {**FusionState().__dict__, "mode": "Overlay", "seq": seq - 1}
    app.run()
    assert app.session_state["fusion_mode"] == "Entropy" and app.session_state["fusion_target"] == 2
    app.session_state["fusion_explorer"] = {"mode": "nonsense", "target": 7, "opacity": "x", "seq": seq + 1}
    app.run()
    assert_healthy(app)
    assert app.session_state["fusion_mode"] == "Overlay" and app.session_state["fusion_target"] == 1


def test_gradient_flow_waits_to_be_asked_and_opens_on_the_detections_level(weights):
    app = start(weights["asff"])
    open_view(app, "Gradient flow")
    assert_healthy(app)
    assert not any(m.label == "Conflict rate" for m in app.metric), "computed before being asked"
    assert [b for b in app.button if b.key == "compute_gradient_flow"]
    index = app.session_state["gradient_detection"] if "gradient_detection" in app.session_state else 0
    compute_gradient_flow(app)
    assert_healthy(app)
    assert any(m.label == "Conflict rate" for m in app.metric)
    from asff_viz import load_model
    from asff_viz.introspection import trace_image

    trace = trace_image(load_model(weights["asff"]), str(sample_path(app.session_state["sample_name"])), size=128,
                        conf_threshold=app.session_state["conf_threshold"])
    assert app.segmented_control(key="gradient_target").value == int(trace.detections[index].level)


def test_compare_does_not_open_on_the_model_against_itself():
    # checkpoints/ holds the embedded ASFF default and the sum-fusion model trained like it: B opens on the other one.
    app = AppTest.from_file(APP, default_timeout=TIMEOUT)
    app.run()
    open_view(app, "Compare checkpoints")
    assert_healthy(app)
    assert not any("same checkpoint as A" in info.value for info in app.info)
    assert any(m.label == "In both" for m in app.metric)
    assert any("sum_synthetic" in caption.value for caption in app.caption) or any(
        "sum_synthetic" in str(getattr(widget, "value", "")) for widget in app.selectbox)


def test_a_shapes_model_on_a_photo_says_what_its_labels_mean(weights):
    app = start(weights["asff"], image_source="Upload")
    app.file_uploader(key="image_upload").set_value(("photo.png", encode(np.full((60, 90, 3), 120, np.uint8), ".png"),
                                                     "image/png")).run()
    assert_healthy(app)
    assert any("synthetic shapes" in info.value and "COCO" in info.value for info in app.info)
    sample = start(weights["asff"])
    assert not any("synthetic shapes" in info.value for info in sample.info)


def test_the_zoomed_crop_shows_the_whole_box():
    from asff_viz.app.views.detection import crop_panels

    image = np.full((240, 360, 3), 128, np.uint8)
    weights = np.random.default_rng(0).dirichlet([1, 1, 1], size=(15, 23)).transpose(2, 0, 1)
    cell = (360 / 416 * 16, 240 / 416 * 16)
    picture = crop_panels(image, weights, cell, np.array([250.0, 60, 355, 200]), 5, 20, "#ff0000", "viridis")
    assert picture.shape[0] == 170
    panel_width = (picture.shape[1] - 3 * 6) // 4
    first = picture[:, :panel_width]
    red = (first[..., 0] == 255) & (first[..., 1] == 0) & (first[..., 2] == 0)
    xs = np.nonzero(red.any(axis=0))[0]
    # The window is x 52..360 (the box's 2.2x square, pushed inside the image): the right edge at 355 is in it.
    assert abs(xs.max() - round((355 - 52) * 170 / 240)) <= 1 and xs.max() < panel_width - 1  # 2-px line
    assert abs(xs.min() - round((250 - 52) * 170 / 240)) <= 1
    for infinite in (np.array([10.0, 10, np.inf, np.inf]), np.array([np.nan, 0, 5, 5])):
        assert crop_panels(image, weights, cell, infinite, 0, 0, "#00ff00", "magma").shape[0] == 170


def test_across_images_summarizes_the_samples(weights):
    app = start(weights["asff"])
    open_view(app, "Across images")
    assert_healthy(app)
    table = app.dataframe[0].value
    assert set(table["size"].astype(str)) <= {"small", "medium", "large", "background"}
    assert "background" in set(table["size"].astype(str))
    # Each (target, size) group is a mean of probability vectors: its three sources sum to one.
    sums = table.groupby(["target", "size"], observed=True)["mean weight"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-9)
    # Sized as `scale-stats` sizes them, by the annotations' area (mask area), not by the box's w x h.
    from asff_viz.analyze.cells import COCO_SIZE_LABELS, coco_size_bins
    from asff_viz.samples import ANNOTATIONS_FILE

    areas = np.array([a["area"] for a in json.loads(ANNOTATIONS_FILE.read_text())["annotations"]])
    counts = np.bincount(coco_size_bins(areas), minlength=3)
    expected = ", ".join(f"{name} {count}" for name, count in zip(COCO_SIZE_LABELS, counts, strict=True))
    assert any(f"objects by size: {expected};" in caption.value for caption in app.caption), expected


def test_a_clicked_dot_opens_its_image_in_the_other_views(weights, monkeypatch):
    from types import SimpleNamespace

    from asff_viz.app.views import dataset
    from asff_viz.samples import list_samples

    name = list_samples()[2]
    choice = dataset.DatasetChoice("samples", tuple(
        dataset.DatasetItem(n, sample_path(n), None, None, ("Sample", n)) for n in list_samples()), True)
    state = {"dataset_chart": {"selection": {"points": [{"customdata": {"0": "2", "1": name}}]}},
             "image_source": "Upload", "view": "Across images"}
    with monkeypatch.context() as patch:
        patch.setattr(dataset, "st", SimpleNamespace(session_state=state))
        dataset.open_clicked(choice)  # the chart's on_select callback
    assert (state["image_source"], state["sample_name"], state["view"]) == ("Sample", name, "Fusion weights")
    # What the callback sets is what the app follows.
    app = start(weights["asff"], image_source="Upload")
    for key in ("image_source", "sample_name", "view"):
        app.session_state[key] = state[key]
    app.run()
    assert_healthy(app)
    height, width = cv2.imread(str(sample_path(name))).shape[:2]
    assert metric(app, "Image") == f"{width}×{height}"


def test_across_images_over_a_folder_outside_the_allowed_root_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("ASFF_VIZ_SERVER_ROOT", str(tmp_path))
    app = start(None, dataset_source="Image folder", dataset_folder="/etc")
    open_view(app, "Across images")
    assert not app.exception
    assert any("outside" in warning.value for warning in app.warning)


def test_the_apps_ground_truth_is_the_datasets():
    # One reading of a COCO file: the boxes the app draws and its loss objective uses are training's (the
    # official conversion), as `gradflow`'s loss objective (GroundTruth.training_boxes).
    import json

    from asff_viz.data.coco import COCODetection
    from asff_viz.samples import SAMPLES_DIR, annotations_from_coco

    annotation_file = SAMPLES_DIR / "annotations.json"
    document = json.loads(annotation_file.read_text())
    dataset = COCODetection(annotation_file, SAMPLES_DIR)
    assert len(dataset) >= 3
    for index in range(len(dataset)):
        info = dataset.info(index)
        targets = dataset.targets(index)
        shown = annotations_from_coco(document, info["file_name"])
        np.testing.assert_allclose(shown.boxes_xyxy, targets[:, 1:], atol=1e-4)
        np.testing.assert_array_equal(shown.class_indices, targets[:, 0].astype(np.int64))


@pytest.mark.parametrize("name", ["mobile_asff", "mobile_baseline"])
def test_every_view_works_on_a_mobilenet_model(weights, name):
    from asff_viz.app.main import DETECTION_ONLY_VIEWS, VIEWS

    app = start(weights[name])
    assert_healthy(app)
    views = VIEWS if name == "mobile_asff" else DETECTION_ONLY_VIEWS
    for view in views:
        if view == "Gradient flow":
            app.session_state["gradient_objective"] = "sum"  # defined with or without detections
        open_view(app, view)
        if view == "Gradient flow":
            compute_gradient_flow(app)
            assert "Conflict rate" in [m.label for m in app.metric]
        assert_healthy(app)
        assert app.get("plotly_chart"), view
    if name == "mobile_asff":
        for mode in ("RGB composite", "Entropy", "Figure 3 grid", "Overlay"):
            explore(open_view(app, "Fusion weights"), mode=mode)
            assert_healthy(app)


def test_a_weighted_fusion_model_shows_its_per_level_scalars(weights):
    app = start(weights["weighted"])
    assert_healthy(app)
    assert any("per-level scalars" in info.value for info in app.info)
    table = app.dataframe[0].value
    assert list(table.columns) == ["target", "from L0", "from L1", "from L2"]
    np.testing.assert_allclose(table[["from L0", "from L1", "from L2"]].sum(axis=1), 1.0, atol=1e-3)  # eps 1e-4
    for view in ("Detections", "Gradient flow", "Counterfactuals", "Across images"):
        if view == "Gradient flow":
            app.session_state["gradient_objective"] = "sum"
        open_view(app, view)
        if view == "Gradient flow":
            compute_gradient_flow(app)
        assert_healthy(app)


def test_across_images_bars_are_the_mean_over_objects_not_over_images():
    # Dots are per-image means, bars the pooled mean of the summary table and scale-stats: an image with three
    # small objects weighs three times in the bar.
    import pandas as pd

    from asff_viz.app.views import dataset

    rows = [{"image": 0, "image_name": "a", "size": "small", "target": 2, "source": s, "weight": w}
            for w in (0.9, 0.9, 0.9) for s in range(3)]
    rows += [{"image": 1, "image_name": "b", "size": "small", "target": 2, "source": s, "weight": 0.1}
             for s in range(3)]
    table = pd.DataFrame(rows)
    figure = dataset.dataset_figure(table, 2, 2)
    bar = next(trace for trace in figure.data if trace.type == "bar")
    assert bar.y[0] == pytest.approx(0.7)  # (3 x 0.9 + 0.1) / 4, not (0.9 + 0.1) / 2
    summary = dataset.summary_table(table)
    first_source = summary[summary["source"] == dataset.SHORT_LEVEL_NAMES[0]]
    assert float(first_source["mean weight"].iloc[0]) == pytest.approx(0.7)
    dots = next(trace for trace in figure.data if trace.type == "scatter")
    assert sorted(dots.y) == pytest.approx([0.1, 0.9])


@pytest.mark.parametrize("field, value", [("bbox", [float("nan"), 1, 20, 20]), ("bbox", [True, 1, 20, 20]),
                                          ("category_id", 1.0)])
def test_uploaded_ground_truth_with_a_malformed_value_is_refused_naming_it(field, value):
    # NaN was dropped silently (its width test is False), true read as 1.0 and 1.0 matched category 1.
    from asff_viz.samples import ANNOTATIONS_FILE, AnnotationError, annotations_from_coco

    document = json.loads(ANNOTATIONS_FILE.read_text())
    document["annotations"][0][field] = value
    with pytest.raises(AnnotationError, match=r"gt\.json: annotations\[0\].*" + field):
        annotations_from_coco(document, document["images"][0]["file_name"], "gt.json")

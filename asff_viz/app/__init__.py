"""The Streamlit app (UI only): `streamlit run app.py`.

- `main`: page layout, sidebar and the views' tabs.
- `inputs`: image, weights and settings controls.
- `cache`: cached calls into the public API (models, traces, gradient flows, attributions) and exports.
- `common`: the analysis object and selection state shared by the views.
- `figures`: interactive plotly figures (image, maps, boxes, clickable cells).
- `fusion_view`, `detection_view`, `gradient_view`, `counterfactual_view`, `compare_view`: one per tab.

Import `asff_viz.app.main` only inside a Streamlit script: the modules call Streamlit at import time
(decorators) and expect a script run context when their functions run.
"""

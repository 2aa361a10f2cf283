"""The Streamlit app (UI only): `streamlit run app.py`.

- `main`: page layout, sidebar and the views' tabs.
- `inputs`: image, weights and settings controls.
- `cached`: cached calls into the public API (models, traces, gradient flows, attributions) and exports.
- `widgets`: the analysis object, the selection state shared by the views and the small widgets that edit it.
- `charts`: interactive plotly charts (image, maps, boxes, clickable cells).
- `explorer/`: the fusion view's browser-side component (plain JavaScript over plotly).
- `views/`: one module per tab (`fusion`, `detection`, `gradient`, `counterfactual`, `compare`, `dataset`).

Import `asff_viz.app.main` only inside a Streamlit script: the modules call Streamlit at import time
(decorators) and expect a script run context when their functions run.
"""

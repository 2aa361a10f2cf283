"""Streamlit entry point: `streamlit run app.py` (or `make app`). The UI lives in `asff_viz.app`."""

from asff_viz.app.main import main

main()

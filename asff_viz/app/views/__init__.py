"""The app's views, one module per tab; each draws from the shared `asff_viz.app.widgets.Analysis`."""

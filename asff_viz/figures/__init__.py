"""Figures for print (matplotlib): the one palette and publication style (`style`), figures of one `Trace`
(`traces`) and the analyses' figures (`plots`). The app's interactive charts are `asff_viz.app.charts`."""

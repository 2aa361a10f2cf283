"""`python -m asff_viz.bench`: see `asff_viz.bench`."""

from . import main

main()

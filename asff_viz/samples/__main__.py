"""`python -m asff_viz.samples`: regenerate the bundled sample images and their annotations."""

from . import generate_samples

if __name__ == "__main__":
    for path in generate_samples():
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")

"""omnilab.plots."""

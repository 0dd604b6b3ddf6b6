"""omnilab.instrument."""

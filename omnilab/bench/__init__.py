"""omnilab.bench."""

"""omnilab.analysis."""

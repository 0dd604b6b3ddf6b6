"""omnilab.widgets."""

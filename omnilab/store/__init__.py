"""omnilab.store."""

"""omnilab.models."""

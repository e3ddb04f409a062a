"""Conversion of dense MLA checkpoints into DSA checkpoints."""

"""Planning: what a model weighs and where each part goes, before any weight is read."""

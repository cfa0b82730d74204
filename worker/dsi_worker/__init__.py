"""Ray Serve application serving DeepSpeed tensor-parallel groups."""

"""The pure core of batch runs: render a batch spec and build its status."""

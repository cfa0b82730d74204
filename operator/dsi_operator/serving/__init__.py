"""The pure core of serving: render a spec, decide restarts, plan a pass, build status."""

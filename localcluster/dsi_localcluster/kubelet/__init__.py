"""Process-backed nodes: a small kubelet whose pods are real processes.

Each pod gets its own network namespace and IP (``netns``), its containers run as process
groups with the pod's env, volumes and hostname (``runtime``, ``podspec``), Service names
resolve through hosts files (``dns``), probes and restarts follow the pod spec (``probes``,
``pods``), and the node registers and heartbeats like a kubelet (``agent``). The project's
virtualenv stands in for every container image.
"""

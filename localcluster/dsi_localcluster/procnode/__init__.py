"""Process-backed nodes: a tiny kubelet whose pods run as real processes.

Each pod gets its own network namespace on a host bridge (`netns`), each container runs
as a process group in its own mount and UTS namespace (`runtime`), and the kubelet runs
httpGet/tcpSocket/exec probes against them (`probes`). Needs root and the Debian packages
iproute2, util-linux and procps.
"""

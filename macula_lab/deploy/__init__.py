"""Running nodes beyond one kernel: headless node config, processes, deployment files, hosts.

- :mod:`.config`: ``macula-lab node`` options from flags and ``MACULA_*`` variables;
- :mod:`.procs`: ``macula-lab node`` processes on this machine;
- :mod:`.manifests`: node environments read from the compose file and the k3s manifests;
- :mod:`.netns`, :mod:`.netns_ip`: those nodes in Linux network namespaces (as root);
- :mod:`.k8s`: finding node pods through the Kubernetes API;
- :mod:`.demo`: the process-level demo (``macula-lab demo``).
"""

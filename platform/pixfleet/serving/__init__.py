"""HTTP serving on Ray Serve: ingress -> model replicas."""

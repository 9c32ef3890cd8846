"""`pixfleet eval`: models compared on a held-out set, and the registry's alias moved by the numbers."""

"""The lab's error type: every lab module (topology, processes, datapaths, teardown, the
lab itself) raises it when building, changing or tearing down a lab fails."""


class LabError(RuntimeError):
    """Building, changing or tearing down a lab failed."""

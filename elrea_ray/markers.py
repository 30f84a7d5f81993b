"""The two names the run directory (artifacts.py) and its object-store transfers (storage.py)
share: the completion marker's file name and the error both raise."""

# The file a finished stage folder holds (its content: the stage key). Uploaded last, deleted first,
# so a folder with the marker is complete wherever it lives.
MARKER = "_COMPLETE"


class ArtifactError(RuntimeError):
    """A stage's input is missing or incomplete, or the run directory is in use."""

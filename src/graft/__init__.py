"""graft: reuse pretrained models — merge, transfer, compress, check and find checkpoints."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("graft")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"

__all__ = ["__version__"]

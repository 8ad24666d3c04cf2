"""bccguard: an SMTP relay that keeps customer addresses from being exposed in To/Cc."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bccguard")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

"""feedrank's command line (the top layer): thin commands that parse arguments and call the layers below."""

from core import __version__  # noqa: F401 - also installs core's interpreter guards before anything else

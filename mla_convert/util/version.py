"""The tool's version, in one place: the package, the report and `--version` read it, and so does pyproject."""

VERSION = "0.1.0"

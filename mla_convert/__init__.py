"""mla-convert: turn MHA/GQA checkpoints into stock DeepSeek-V3 Multi-head Latent Attention checkpoints.

`convert`, `dry_run` and `verify_output` are the Python API (api.py); `Options` holds every setting (options.py). The
pipeline, one subpackage a stage, run in this order by job.py: source (load) -> plan -> conversion
(calibrate and convert, with the math in mla/) -> write -> train (fine-tune) -> evaluate -> report, with
engines/ beside it. docs/development.md has the tree.
"""

from .api import convert, dry_run, verify_output
from .errors import ConversionError
from .hooks import Hooks
from .options import Options, TrainSettings
from .util.version import VERSION

__version__ = VERSION
__all__ = ["ConversionError", "Hooks", "Options", "TrainSettings", "__version__", "convert", "dry_run", "verify_output"]

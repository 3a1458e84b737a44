"""mla-convert: turn Llama-family MHA/GQA checkpoints into stock DeepSeek-V3 MLA checkpoints.

`convert` and `dry_run` are the Python API (see mla_convert.api); `Options` holds every setting.
"""

from .api import convert, dry_run
from .errors import ConversionError
from .hooks import Hooks
from .options import Options, TrainSettings

__version__ = "0.1.0"
__all__ = ["ConversionError", "Hooks", "Options", "TrainSettings", "__version__", "convert", "dry_run"]

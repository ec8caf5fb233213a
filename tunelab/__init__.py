"""tunelab: adapt pretrained models to your own task, and measure honestly whether it worked."""
from tunelab.config import Config
from tunelab.errors import UserError

# Imported eagerly: `tunelab.train` must be this function, not the `tunelab/train.py` loop module that the
# pipeline imports (Python binds a submodule to its parent's attribute when it is first loaded).
from tunelab.pipeline import TrainResult, train  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Config", "UserError", "train", "TrainResult"]

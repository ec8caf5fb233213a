"""tunelab: adapt pretrained models to your own task, and measure honestly whether it worked."""
from tunelab.config import Config
from tunelab.errors import UserError

__version__ = "0.1.0"
__all__ = ["Config", "UserError", "train", "TrainResult"]


def __getattr__(name):
    # Importing the pipeline pulls in torch and transformers; `import tunelab` for the config alone stays fast.
    if name in ("train", "TrainResult"):
        from tunelab import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)

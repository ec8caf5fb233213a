"""tunelab: adapt pretrained models to your own task, and measure honestly whether it worked."""
import logging

from tunelab import vision_ops
from tunelab.config import Config
from tunelab.errors import UserError

vision_ops.install()  # before anything imports transformers, which imports torchvision where it is installed
# transformers and peft import bitsandbytes wherever it is installed (the qlora extra); on a CPU with bfloat16 units
# it then looks for a faster kernel on the Hub (the `kernels` package) and warns that it is not there. It computes
# with its own, and tunelab downloads nothing at run time: not a warning for users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
__all__ = ["Config", "UserError", "train", "TrainResult"]


def __getattr__(name: str):
    """`tunelab.train` and `tunelab.TrainResult`, imported on first use: the service's API process imports
    tunelab without ever loading the training loop."""
    if name in ("train", "TrainResult"):
        from tunelab import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")

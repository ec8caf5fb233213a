"""Tasks: what the model learns. Adding one is a module plus one line in this plain dict."""
from tunelab.tasks.base import Space, Task
from tunelab.tasks.classification import Classification, Multilabel
from tunelab.tasks.image import ImageClassification, ImageMultilabel
from tunelab.tasks.lm import CausalLM, ChatSFT, MaskedLM, PreTraining
from tunelab.tasks.preference import DPO, RewardModel
from tunelab.tasks.ner import Ner
from tunelab.tasks.regression import Regression
from tunelab.tasks.rl import Reinforce

TASKS: dict[str, Task] = {
    "classification": Classification(),
    "multilabel": Multilabel(),
    "regression": Regression(),
    "ner": Ner(),
    "clm": CausalLM(),
    "mlm": MaskedLM(),
    "nsp": PreTraining(),
    "chat": ChatSFT(),
    "dpo": DPO(),
    "reward": RewardModel(),
    "rl": Reinforce(),
    "image-classification": ImageClassification(),
    "image-multilabel": ImageMultilabel(),
}

__all__ = ["TASKS", "Space", "Task"]

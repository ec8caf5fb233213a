"""Tuning methods. Adding one is a file plus one line in this plain dict."""
from tunelab.methods.base import Method
from tunelab.methods.distill import Distill
from tunelab.methods.full import Full
from tunelab.methods.lora import Lora
from tunelab.methods.simple import Head, Partial, Scratch

METHODS: dict[str, Method] = {
    "scratch": Scratch(),
    "head": Head(),
    "partial": Partial(),
    "full": Full(),
    "lora": Lora(),
    "distill": Distill(),
}

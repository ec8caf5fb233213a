"""torchvision beside a CPU-only torch: its compiled operators cannot load, so they are declared without kernels.

PyPI's torchvision wheel for Linux x86_64 is built against the CUDA build of torch: its compiled library
(`torchvision/_C.so`, the detection operators nms, roi_align, deform_conv2d, ...) links libtorch_cuda.so. Beside
the CPU build of torch (the one tunelab pins and installs) that library cannot load, and `import torchvision`
then fails in `torchvision/_meta_registrations.py` with "operator torchvision::nms does not exist". transformers
imports torchvision whenever it is installed, so the failure would reach every model, text ones included.

tunelab uses torchvision's pure-Python parts only (transforms.v2 for augmentation, and through timm its model
building blocks), never those detection operators. So, the first time anything imports torchvision, `install()`'s
import hook tries to load the compiled library; where it loads (a matching torch and torchvision, CPU or GPU) it
does nothing more. Where it cannot, it declares the operators' schemas, exactly as the library would, with no
kernels: torchvision imports, and calling one of those operators fails with PyTorch's own "could not run
'torchvision::nms' with arguments from the 'CPU' backend" error instead of succeeding wrongly.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

# The schemas torchvision 0.28's _C library registers (torchvision/csrc/ops/*.cpp).
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, float rois_scale, "
    "int rois_zero_point, float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
    "bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) "
    "-> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
    "SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)

declared = False  # True once the schemas were declared here (the compiled library did not load)
_library = None  # the torch.library.Library that holds them: it must outlive the import


def prepare(package: Path) -> None:
    """Load torchvision's compiled operators from `package` (its folder), or declare them without kernels."""
    global declared, _library
    import torch

    found = sorted(package.glob("_C.*so")) + sorted(package.glob("_C.*pyd"))
    if not found or _library is not None:
        return
    try:
        torch.ops.load_library(str(found[0]))
        return
    except OSError:
        pass
    if hasattr(torch.ops.torchvision, "nms"):  # registered by someone else already
        return
    _library = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        _library.define(schema)
    declared = True


class _Hook(importlib.abc.MetaPathFinder):
    """Runs `prepare` just before torchvision is first imported, then steps aside for the normal import."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            prepare(Path(list(spec.submodule_search_locations)[0]))
        return spec


def install() -> None:
    """Arm the hook once per process (a no-op when torchvision is already imported)."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())

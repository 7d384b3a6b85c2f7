"""Deploy the student: ONNX export of the deployable model (student + its KD layers) with the
torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``), checked against PyTorch
with onnxruntime."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["export_onnx", "to_onnx"]

# weights above 1 GiB go to an external ``<output>.data`` file (protobuf caps one file at 2 GiB)
_ONE_FILE_LIMIT = 1 << 30


def to_onnx(model: nn.Module, example: torch.Tensor, output: str | Path, *, metadata: dict[str, str] | None = None,
            opset: int = 18) -> Path:
    """Write ``model`` (eval mode, one image-batch input) to ``output`` as ONNX with a dynamic
    batch dimension: input ``images``, output ``logits``, ``metadata`` in the model's
    metadata_props. Uses the torch.export-based exporter; needs ``onnxscript``. Returns ``output``."""
    try:
        import onnxscript  # noqa: F401 - the exporter's own dependency; say so before torch does
    except ImportError as e:
        raise RuntimeError("ONNX export needs onnxscript (torch's exporter): pip install 'letkd[export]'") from e
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        # KD layers keep their last scores (for the training loss) as a plain attribute; torch.export
        # warns that it is assigned during export, which is harmless: the graph does not read it
        warnings.filterwarnings("ignore", message=r"The tensor attributes .*last_scores.* were assigned during export")
        program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False)
    for key, value in (metadata or {}).items():
        program.model.metadata_props[key] = value
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    program.save(str(output), external_data=weight_bytes > _ONE_FILE_LIMIT)
    return output


def export_onnx(ckpt: dict[str, Any], output: str | Path, verify: bool = True, atol: float = 1e-4,
                opset: int = 18) -> dict[str, Any]:
    """Export ``ckpt``'s deployable student to ONNX (dynamic batch). The input is the
    normalised image (mean/std stored in the model's metadata). With ``verify``, run it under
    onnxruntime on random inputs of another batch size and compare with PyTorch; raise if they
    differ by more than ``atol``."""
    from letkd.engine.trainer import rebuild_deployable

    model, cfg, info = rebuild_deployable(ckpt, "cpu")
    model = model.float().eval()
    shape = (2, info["in_channels"], *info["image_size"])
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    meta = {"letkd_mean": str(info["mean"]), "letkd_std": str(info["std"]), "letkd_model": cfg.model.name,
            "letkd_method": cfg.method_name}
    output = to_onnx(model, example, output, metadata=meta, opset=opset)
    report: dict[str, Any] = {"onnx": str(output), "model": cfg.model.name, "method": cfg.method_name,
                              "input_shape": ["batch", *shape[1:]], "mean": info["mean"], "std": info["std"],
                              "params": sum(p.numel() for p in model.parameters())}
    if verify:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeError("verification needs onnxruntime: pip install 'letkd[export]' (or pass --no-verify)") from e
        sess = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        x = torch.randn(5, *shape[1:], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {"images": x.numpy()})[0]
        diff = float(np.abs(ref - got).max())
        report["max_abs_diff"] = diff
        if not diff <= atol:
            raise RuntimeError(f"ONNX output differs from PyTorch by {diff:.3g} (> {atol}); the export is not faithful")
    return report

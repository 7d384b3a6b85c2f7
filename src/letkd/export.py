"""Deploy the student: ONNX export of the deployable model (student + its KD layers), checked
against PyTorch with onnxruntime."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["export_onnx"]


def export_onnx(ckpt: dict[str, Any], output: str | Path, verify: bool = True, atol: float = 1e-4,
                opset: int = 17) -> dict[str, Any]:
    """Export ``ckpt``'s deployable student to ONNX (dynamic batch). The input is the
    normalised image (mean/std stored in the model's metadata). With ``verify``, run it under
    onnxruntime on random inputs and compare with PyTorch; raise if they differ by more than
    ``atol``."""
    from letkd.engine.trainer import rebuild_deployable

    model, cfg, info = rebuild_deployable(ckpt, "cpu")
    model = model.float().eval()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    shape = (2, info["in_channels"], *info["image_size"])
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    torch.onnx.export(model, (example,), str(output), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                      dynamo=False)
    report: dict[str, Any] = {"onnx": str(output), "model": cfg.model.name, "method": cfg.method_name,
                              "input_shape": ["batch", *shape[1:]], "mean": info["mean"], "std": info["std"],
                              "params": sum(p.numel() for p in model.parameters())}
    try:
        import onnx

        m = onnx.load(str(output))
        for k, v in {"letkd_mean": info["mean"], "letkd_std": info["std"], "letkd_model": cfg.model.name,
                     "letkd_method": cfg.method_name}.items():
            entry = m.metadata_props.add()
            entry.key, entry.value = k, str(v)
        onnx.save(m, str(output))
    except ImportError:
        pass
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

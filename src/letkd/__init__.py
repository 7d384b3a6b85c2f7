"""letkd: knowledge distillation for image classification around the KD layer that lets the
student decide (Görgün, Gürbüz, Alatan, BMVC 2023, arXiv 2309.02843)."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["KDLayer", "__version__"]


def __getattr__(name: str):
    if name == "KDLayer":
        from letkd.layers import KDLayer

        return KDLayer
    raise AttributeError(f"module 'letkd' has no attribute {name!r}")

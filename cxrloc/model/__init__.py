"""Network of cxrloc: anti-aliased ResNet backbone, patch head, PAC-CRF."""

from cxrloc.model.net import CXRLocNet, build_model

__all__ = ["CXRLocNet", "build_model"]

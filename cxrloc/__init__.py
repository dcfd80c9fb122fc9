"""cxrloc: localization of chest X-ray findings with limited box annotation.

Implements Rozenberg, Freedman & Bronstein (2019), "Localization with Limited
Annotation for Chest X-rays", beside the baseline of Li et al. (CVPR 2018).
"""

from cxrloc.classes import BOXED_CLASSES, CLASSES, NUM_CLASSES

__version__ = "0.1.0"

__all__ = ["BOXED_CLASSES", "CLASSES", "NUM_CLASSES", "__version__"]

"""fastxent: softmax cross-entropy with its analytic gradient in one pass, lean on memory."""

from fastxent.functional import BACKENDS, cross_entropy
from fastxent.modules import CrossEntropyLoss

__version__ = "0.1.0"

__all__ = ["BACKENDS", "CrossEntropyLoss", "__version__", "cross_entropy"]

"""fastxent: softmax cross-entropy with its analytic gradient in one pass, lean on memory."""

from fastxent._autograd import empty_cache
from fastxent.distributed import vocab_parallel_cross_entropy
from fastxent.functional import BACKENDS, cross_entropy, linear_cross_entropy
from fastxent.modules import CrossEntropyLoss, LinearCrossEntropyLoss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "__version__",
    "cross_entropy",
    "empty_cache",
    "linear_cross_entropy",
    "vocab_parallel_cross_entropy",
]

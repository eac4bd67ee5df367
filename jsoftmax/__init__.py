"""jsoftmax: the softmax family for JAX, with hand-written backward passes."""

from jsoftmax import testing as testing
from jsoftmax._jacobian import softmax_jacobian as softmax_jacobian
from jsoftmax._softmax import log_softmax as log_softmax
from jsoftmax._softmax import softmax as softmax

__version__ = "0.1.0"

__all__ = [
    "log_softmax",
    "softmax",
    "softmax_jacobian",
    "testing",
]

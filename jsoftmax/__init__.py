"""jsoftmax: the softmax family for JAX, with hand-written backward passes."""

from jsoftmax import testing as testing
from jsoftmax._attention import dot_product_attention as dot_product_attention
from jsoftmax._context_parallel import from_zigzag as from_zigzag
from jsoftmax._context_parallel import to_zigzag as to_zigzag
from jsoftmax._cross_entropy import softmax_cross_entropy as softmax_cross_entropy
from jsoftmax._cross_entropy import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,  # noqa: E501
)
from jsoftmax._flax import flax_attention_fn as flax_attention_fn
from jsoftmax._forward_mode import with_forward_mode as with_forward_mode
from jsoftmax._jacobian import softmax_jacobian as softmax_jacobian
from jsoftmax._linear_cross_entropy import (
    linear_softmax_cross_entropy as linear_softmax_cross_entropy,
)
from jsoftmax._softmax import log_softmax as log_softmax
from jsoftmax._softmax import softmax as softmax

__version__ = "0.1.0"

__all__ = [
    "dot_product_attention",
    "flax_attention_fn",
    "from_zigzag",
    "linear_softmax_cross_entropy",
    "log_softmax",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_jacobian",
    "testing",
    "to_zigzag",
    "with_forward_mode",
]

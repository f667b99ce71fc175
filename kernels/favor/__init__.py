"""FAVOR+ (Performer) linear attention over packed sequences.

`naive.py` holds the plain-PyTorch definition (``favor_attention``, the padded entry, and
`draw_projection`); the fused Triton kernel is built against it.
"""

from .naive import draw_projection

__all__ = ["draw_projection"]

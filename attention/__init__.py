"""Attention for the FlashVSR DiT: dense (cross-attention) and 128x128 block-sparse (LCSA).

The models never pick a kernel themselves: they call an :class:`AttentionSession`, which the
pipeline creates per run from the user's mode (``enable`` / ``disable`` SageAttention). Optional
packages (sageattention, triton) are imported on first use, never here.
"""
from .dispatch import BLOCK, MODES, AttentionConfig, AttentionDispatcher, AttentionSession

__all__ = ["AttentionConfig", "AttentionDispatcher", "AttentionSession", "BLOCK", "MODES"]

"""Training on top of `keras_gemma2.data`: fitting loops, and (to come) LoRA
helpers, distillation and training callbacks.

May import `data`, `generation` and `checkpoints`; nothing below imports it.
"""

from keras_gemma2.training.fit_on_windows import fit_on_windows

__all__ = ["fit_on_windows"]

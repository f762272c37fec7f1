"""LoRA methods of `Gemma2Backbone`: thin facades over `keras_gemma2.training`."""


class Gemma2LoraMethods:
    """Mixin holding `Gemma2Backbone`'s LoRA API (filled by the LoRA work)."""

"""Training-time methods of `Gemma2CausalLM` (loss, memory), as a mixin."""


class Gemma2TrainingMethods:
    """Mixin holding `Gemma2CausalLM`'s training overrides (loss, remat)."""

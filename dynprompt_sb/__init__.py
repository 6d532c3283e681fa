"""Speaker-aware dynamic prompts on a frozen WavLM, for SpeechBrain.

Li, Mak, Lee, Meng, "Parameter-efficient Fine-tuning of Speaker-Aware
Dynamic Prompts for Speaker Verification", Interspeech 2024.
"""

from dynprompt_sb.layer_sum import WeightedLayerSum
from dynprompt_sb.prompt_pool import PromptPool
from dynprompt_sb.prompted_wavlm import PromptedWavLM

__all__ = ["PromptPool", "PromptedWavLM", "WeightedLayerSum"]
__version__ = "0.1.0"

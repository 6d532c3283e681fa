"""Speaker-aware dynamic prompts on a frozen WavLM, for SpeechBrain."""

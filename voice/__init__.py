"""The voice path, one module per stage: audio -> vad -> asr -> llm -> tts, joined by pipeline."""

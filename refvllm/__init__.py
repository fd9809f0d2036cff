"""refvllm: fine-tuning referring video-LLMs (videos + per-object masks + conversations naming objects)."""

__version__ = "0.1.0"

"""rollwire: exact multi-turn, multimodal RL rollouts for vision-language models."""

__version__ = "0.1.0"

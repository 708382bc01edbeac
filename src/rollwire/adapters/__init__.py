"""Samples in the formats other trainers take: prime-rl, verl, SkyRL.

Each adapter gives plain Python / numpy (or torch) values under the peer's own field names, so no
peer package is needed to build them; pass them to the peer's type (`TrainingSample(**d)`,
`AgentLoopOutput(**d)`, `DataProto.from_dict(...)`, a `GeneratorOutput` dict) in the trainer.
Multi-turn samples keep one token stream: the environment's tokens between assistant turns are in
it with mask 0, and logprobs are aligned token for token (0 where nothing was sampled).
"""

from rollwire.adapters.prime_rl import prime_rl_sample, prime_rl_samples
from rollwire.adapters.skyrl import skyrl_generator_output
from rollwire.adapters.verl import verl_agent_loop_output, verl_batch

__all__ = ["prime_rl_sample", "prime_rl_samples", "skyrl_generator_output", "verl_agent_loop_output", "verl_batch"]

"""Optional integrations that log other libraries' training runs in the run-log format.

Nothing here is imported by `simfluence` itself, and importing this package imports no training
library: each integration imports its library (torch, transformers) when it is first used.

- `simfluence.integrations.hf`: `SimfluenceCallback`, a Hugging Face `transformers.Trainer`
  callback that trains a fixed curriculum and writes a complete run (needs torch and
  transformers and accelerate: `pip install -e ".[hf]"`).
"""

__all__: list[str] = []

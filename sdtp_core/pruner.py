"""Token-pruning modules: one small scorer MLP per pruning stage (paper eq. 1-2)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sdtp_core.config import PrunerConfig, PrunerConfigError
from sdtp_core.selection import recent_slots

WEIGHTS_NAME = "model.safetensors"


def rms_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x`` divided by its root mean square over the last dimension (no parameters)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class StageScorer(nn.Module):
    """``score = W2 · GELU(W1 · h + b1) + b2``: one importance score per token from its hidden state.

    With ``input_norm="rms"``, ``h`` is first divided by its root mean square (no parameters), so every
    stage's MLP sees inputs of the same scale whatever the depth. With ``query`` the MLP reads
    ``[h, h * q]`` for a per-row query vector ``q`` (see :class:`~sdtp_core.config.PrunerConfig`)."""

    def __init__(self, hidden_size: int, scorer_hidden: int, input_norm: str = "none", query: bool = False):
        super().__init__()
        self.input_norm = input_norm
        self.query = query
        self.fc1 = nn.Linear(hidden_size * (2 if query else 1), scorer_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(scorer_hidden, 1)

    def forward(self, hidden_states: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, seq, hidden) [and (batch, hidden) ``query``] -> (batch, seq) scores, in the input's dtype."""
        if self.input_norm == "rms":
            hidden_states = rms_normalize(hidden_states)
        if self.query:
            hidden_states = torch.cat([hidden_states, hidden_states * query[:, None, :]], dim=-1)
        return self.fc2(self.act(self.fc1(hidden_states))).squeeze(-1)


class TokenPruner(nn.Module):
    """The pruning modules of all stages plus their :class:`PrunerConfig`.

    Saved like a Hugging Face artifact: ``config.json`` + ``model.safetensors``.
    """

    def __init__(self, config: PrunerConfig):
        super().__init__()
        self.config = config
        self.stages = nn.ModuleList(
            StageScorer(config.hidden_size, config.scorer_hidden, config.input_norm, config.query)
            for _ in range(config.num_stages)
        )

    def score(self, stage: int, hidden_states: torch.Tensor, **context) -> torch.Tensor:
        """Scores of stage ``stage`` for ``hidden_states`` (batch, seq, hidden); higher means keep.

        ``context`` (the stage's decoder layer, rotary embeddings, live slots ``valid``, original
        ``positions``, prompt ``lengths``) is what training-free scorers (:mod:`sdtp_core.scorers`) and the
        oracle (:mod:`sdtp_core.oracle`) use; the trained MLPs read the hidden states, and a ``query`` pruner
        also the mean of the prompt's protected most recent states (``positions``, ``lengths``, ``valid``)."""
        scorer = self.stages[stage]
        hidden_states = hidden_states.to(scorer.fc1.weight.dtype)
        if not self.config.query:
            return scorer(hidden_states)
        missing = [name for name in ("positions", "lengths", "valid") if context.get(name) is None]
        if missing:
            raise ValueError(f"a query pruner needs {missing} to find the prompt's most recent tokens")
        recent = recent_slots(context["positions"], context["lengths"], self.config.keep_recent) & context["valid"]
        weights = recent.to(hidden_states.dtype)[:, :, None]
        query = (rms_normalize(hidden_states) * weights).sum(1) / weights.sum(1).clamp(min=1)
        return scorer(hidden_states, query)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        directory = Path(directory)
        self.config.save(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> TokenPruner:
        """Load a pruner directory written by :meth:`save_pretrained`; errors name the broken file."""
        directory = Path(directory)
        if not directory.is_dir():
            raise PrunerConfigError(f"pruner directory {directory} does not exist")
        config = PrunerConfig.load(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise PrunerConfigError(f"{weights} not found")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise PrunerConfigError(f"{weights} is corrupt: {e}") from e
        pruner = cls(config)
        expected = {k: tuple(v.shape) for k, v in pruner.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if expected != found:
            raise PrunerConfigError(
                f"{weights} does not match {directory / 'config.json'}: expected tensors {expected}, found {found}"
            )
        pruner.load_state_dict(state)
        if dtype is not None:
            pruner.to(dtype)
        return pruner.eval()

    @classmethod
    def for_model(cls, model, layers: list[int] | None = None, r: float = 0.9, seed: int | None = 0, **kw):
        """A freshly initialised (untrained) pruner with the default schedule for ``model``.

        Untrained scorers give random-but-fixed scores, which is what speed measurements need.
        """
        config = PrunerConfig.for_model(model.config, layers=layers, r=r, **kw)
        if seed is not None:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                pruner = cls(config)
        else:
            pruner = cls(config)
        return pruner.to(dtype=model.dtype, device=model.device).eval()

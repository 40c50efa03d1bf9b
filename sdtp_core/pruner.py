"""Token-pruning modules: one small scorer MLP per pruning stage (paper eq. 1-2)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sdtp_core.config import PrunerConfig, PrunerConfigError
from sdtp_core.question_features import needs_lines, question_features, tail_attention
from sdtp_core.selection import recent_slots

WEIGHTS_NAME = "model.safetensors"
#: hidden width of the MLP that reads the question-aware features
FEATURE_HIDDEN = 32


def rms_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x`` divided by its root mean square over the last dimension (no parameters)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class StageScorer(nn.Module):
    """``score = W2 · GELU(W1 · h + b1) + b2``: one importance score per token from its hidden state.

    With ``input_norm="rms"``, ``h`` is first divided by its root mean square (no parameters), so every
    stage's MLP sees inputs of the same scale whatever the depth. With ``query`` the MLP reads
    ``[h, h * q]`` for a per-row query vector ``q`` (see :class:`~sdtp_core.config.PrunerConfig`). With
    ``features`` > 0 a second MLP reads that many question-aware features per token
    (:mod:`sdtp_core.question_features`) and its score is added."""

    def __init__(
        self, hidden_size: int, scorer_hidden: int, input_norm: str = "none", query: bool = False, features: int = 0
    ):
        super().__init__()
        self.input_norm = input_norm
        self.query = query
        self.fc1 = nn.Linear(hidden_size * (2 if query else 1), scorer_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(scorer_hidden, 1)
        self.feature_mlp = (
            nn.Sequential(nn.Linear(features, FEATURE_HIDDEN), nn.GELU(), nn.Linear(FEATURE_HIDDEN, 1))
            if features
            else None
        )

    def forward(
        self, hidden_states: torch.Tensor, query: torch.Tensor | None = None, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(batch, seq, hidden) [and (batch, hidden) ``query``, (batch, seq, F) ``features``] -> (batch, seq)
        scores, in the input's dtype."""
        if self.input_norm == "rms":
            hidden_states = rms_normalize(hidden_states)
        if self.query:
            hidden_states = torch.cat([hidden_states, hidden_states * query[:, None, :]], dim=-1)
        scores = self.fc2(self.act(self.fc1(hidden_states))).squeeze(-1)
        if self.feature_mlp is not None:
            scores = scores + self.feature_mlp(features.to(scores.dtype)).squeeze(-1)
        return scores


class TokenPruner(nn.Module):
    """The pruning modules of all stages plus their :class:`PrunerConfig`.

    Saved like a Hugging Face artifact: ``config.json`` + ``model.safetensors``.
    """

    def __init__(self, config: PrunerConfig):
        super().__init__()
        self.config = config
        self.stages = nn.ModuleList(
            StageScorer(config.hidden_size, config.scorer_hidden, config.input_norm, config.query, len(config.features))
            for _ in range(config.num_stages)
        )
        #: (vocab,) which token ids end a line, for ``line:B:A`` features (:meth:`set_line_ends`); the engine then
        #: passes each slot's line (``segments``) to :meth:`score`
        self.register_buffer("sentence_ends", None, persistent=False)

    @property
    def needs_lines(self) -> bool:
        """Whether a feature stays within lines (the model's tokenizer must then give :meth:`set_line_ends`)."""
        return needs_lines(self.config.features)

    def set_line_ends(self, ends: torch.Tensor) -> None:
        """Which token ids end a line (:func:`~sdtp_core.spans.sentence_ends` with ``"\\n"``)."""
        self.sentence_ends = ends.to(self.stages[0].fc1.weight.device) if ends is not None else None

    def score(self, stage: int, hidden_states: torch.Tensor, **context) -> torch.Tensor:
        """Scores of stage ``stage`` for ``hidden_states`` (batch, seq, hidden); higher means keep.

        ``context`` (the stage's decoder layer, rotary embeddings, live slots ``valid``, original
        ``positions``, prompt ``lengths``) is what training-free scorers (:mod:`sdtp_core.scorers`) and the
        oracle (:mod:`sdtp_core.oracle`) use; the trained MLPs read the hidden states, and a ``query`` pruner
        also the mean of the prompt's protected most recent states (``positions``, ``lengths``, ``valid``).
        A pruner with ``features`` takes them precomputed (``features`` (batch, seq, F), as training does) or
        computes them from ``layer``, ``position_embeddings``, ``valid``, ``protected`` and ``segments``."""
        scorer = self.stages[stage]
        features = self.features(hidden_states, **context) if self.config.features else None
        hidden_states = hidden_states.to(scorer.fc1.weight.dtype)
        if not self.config.query:
            return scorer(hidden_states, features=features)
        missing = [name for name in ("positions", "lengths", "valid") if context.get(name) is None]
        if missing:
            raise ValueError(f"a query pruner needs {missing} to find the prompt's most recent tokens")
        recent = recent_slots(context["positions"], context["lengths"], self.config.keep_recent) & context["valid"]
        weights = recent.to(hidden_states.dtype)[:, :, None]
        query = (rms_normalize(hidden_states) * weights).sum(1) / weights.sum(1).clamp(min=1)
        return scorer(hidden_states, query, features)

    def features(
        self,
        hidden_states: torch.Tensor,
        *,
        features: torch.Tensor | None = None,
        layer: nn.Module | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        valid: torch.Tensor | None = None,
        protected: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        **context,
    ) -> torch.Tensor:
        """(batch, seq, F) the question-aware features of ``config.features`` at a stage: ``features`` if given,
        else computed from the stage's decoder ``layer`` on ``hidden_states`` (:mod:`sdtp_core.question_features`)."""
        if features is not None:
            return features
        if layer is None or position_embeddings is None or valid is None:
            raise ValueError("a pruner with features needs the stage's layer, position_embeddings and valid slots")
        attention = tail_attention(layer, hidden_states, position_embeddings, valid, self.config.feature_window)
        return question_features(self.config.features, attention, valid, protected, segments)

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

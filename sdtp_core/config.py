"""Pruner configuration: where the pruning stages sit, how much each keeps, and which tokens are protected."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdtp_core.question_features import parse_feature

CONFIG_NAME = "config.json"
INPUT_NORMS = ("none", "rms")


class PrunerConfigError(ValueError):
    """A pruner configuration is inconsistent or does not fit the model."""


def default_layers(num_layers: int, num_stages: int = 10, start: int = 4) -> list[int]:
    """The paper's placement: ``num_stages`` stages from layer ``start`` spread evenly over the rest.

    For a 24-layer model this is layers 4, 6, ..., 22; for 28 layers 4, 6, 9, 11, 14, 16, 18, 21, 23, 26.
    """
    if num_layers - start < num_stages:
        raise PrunerConfigError(
            f"cannot place {num_stages} pruning stages after layer {start} in a {num_layers}-layer model"
        )
    step = (num_layers - start) / num_stages
    return [start + round(i * step) for i in range(num_stages)]


def earlier_layers(num_layers: int, num_stages: int = 10, start: int = 4) -> list[int]:
    """:func:`default_layers`, each stage one layer earlier: for a 24-layer model 3, 5, ..., 21.

    The schedule of the ``spread`` and ``line`` scorers: on the embedded model the spread attention scores find the
    multi-key needles' values at odd layers, not at the even default ones (docs/history.md, "Which layer can find
    the needle?").
    """
    return [layer - 1 for layer in default_layers(num_layers, num_stages, start)]


def geometric_keep_ratios(num_stages: int = 10, r: float = 0.9) -> list[float]:
    """Stage ``s`` (1-based) keeps ``r**s`` of the original tokens (the paper's schedule)."""
    if not 0.0 < r <= 1.0:
        raise PrunerConfigError(f"keep ratio r must be in (0, 1], got {r}")
    return [r ** (s + 1) for s in range(num_stages)]


@dataclass
class PrunerConfig:
    """Everything that defines a pruner apart from its weights.

    Attributes:
        hidden_size: hidden size of the model the pruner was built for.
        num_hidden_layers: number of decoder layers of that model.
        layers: decoder layer index of each pruning stage (strictly increasing). Stage ``s`` scores the
            input hidden states of layer ``layers[s]`` and drops tokens before that layer runs.
        keep_ratios: fraction of the *original* tokens kept after stage ``s`` (non-increasing, in (0, 1]).
        keep_first: the first tokens of every prompt are never pruned (attention sinks).
        keep_recent: the most recent fraction of the prompt is never pruned.
        mlp_ratio: hidden width of each stage's scorer MLP as a fraction of ``hidden_size``.
        input_norm: ``"none"`` (the paper: the MLP reads the raw hidden state) or ``"rms"`` (the hidden
            state divided by its root mean square first, parameter-free; the residual stream's norm grows
            ~6x from layer 4 to 22 in the embedded model, see docs/training.md). Configs written before
            this field existed load as ``"none"``.
        query: the scorer also reads the prompt's question (not in the paper). In a causal model a token's
            hidden state cannot depend on the question that follows it in a long-context prompt; the
            protected most recent tokens (``keep_recent``) have read the whole prompt. With ``query`` each
            stage's MLP reads ``[x, x * q]``: ``x`` the token's RMS-normalised state, ``q`` the mean
            RMS-normalised state of the prompt's protected most recent tokens. Needs ``input_norm="rms"``.
            Configs written before this field existed load as ``False``.
        features: question-aware inputs (not in the paper; :mod:`sdtp_core.question_features`): each stage also
            reads, per token, the attention the prompt's last ``feature_window`` slots pay it in the stage layer and
            that attention's maximum over spans around it (``attn``, ``span:B:A``, ``line:B:A``), through a second
            small MLP whose score adds to the hidden-state MLP's. Empty: the paper's scorer.
        feature_window: how many of the most recent slots the ``features`` read the attention of.
    """

    hidden_size: int
    num_hidden_layers: int
    layers: list[int] = field(default_factory=list)
    keep_ratios: list[float] = field(default_factory=list)
    keep_first: int = 4
    keep_recent: float = 0.1
    mlp_ratio: float = 0.125
    input_norm: str = "none"
    query: bool = False
    features: list[str] = field(default_factory=list)
    feature_window: int = 64

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        self.keep_ratios = [float(x) for x in self.keep_ratios]
        self.features = [str(x) for x in self.features]
        self.validate()

    @classmethod
    def default(
        cls, hidden_size: int, num_hidden_layers: int, r: float = 0.9, num_stages: int = 10, start: int = 4, **kw
    ) -> PrunerConfig:
        """The paper's default schedule for a model of the given shape."""
        layers = default_layers(num_hidden_layers, num_stages, start)
        return cls(hidden_size, num_hidden_layers, layers, geometric_keep_ratios(len(layers), r), **kw)

    @classmethod
    def for_model(cls, model_config, layers: list[int] | None = None, r: float = 0.9, **kw) -> PrunerConfig:
        """A schedule for a Hugging Face model config; ``layers`` defaults to the paper's placement."""
        h, n = model_config.hidden_size, model_config.num_hidden_layers
        if layers is None:
            return cls.default(h, n, r=r, **kw)
        return cls(h, n, list(layers), geometric_keep_ratios(len(layers), r), **kw)

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    @property
    def scorer_hidden(self) -> int:
        return max(1, int(round(self.hidden_size * self.mlp_ratio)))

    @property
    def scorer_input(self) -> int:
        """Width of each scorer MLP's input: the hidden state, and with ``query`` its product with the query."""
        return self.hidden_size * (2 if self.query else 1)

    def validate(self) -> None:
        """Raise :class:`PrunerConfigError` naming the first problem found."""
        if self.hidden_size <= 0 or self.num_hidden_layers <= 0:
            raise PrunerConfigError("hidden_size and num_hidden_layers must be positive")
        if len(self.layers) != len(self.keep_ratios):
            raise PrunerConfigError(
                f"{len(self.layers)} stage layers but {len(self.keep_ratios)} keep ratios; give one ratio per stage"
            )
        for layer in self.layers:
            if not 0 < layer < self.num_hidden_layers:
                raise PrunerConfigError(
                    f"stage layer {layer} is out of range: a {self.num_hidden_layers}-layer model can prune "
                    f"before layers 1..{self.num_hidden_layers - 1}"
                )
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise PrunerConfigError(f"stage layers must be strictly increasing, got {self.layers}")
        for ratio in self.keep_ratios:
            if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
                raise PrunerConfigError(f"keep ratio {ratio} is outside (0, 1]")
        if any(b > a for a, b in zip(self.keep_ratios, self.keep_ratios[1:])):
            raise PrunerConfigError(f"keep ratios must not increase from stage to stage, got {self.keep_ratios}")
        if self.keep_first < 0 or not 0.0 <= self.keep_recent <= 1.0:
            raise PrunerConfigError("keep_first must be >= 0 and keep_recent in [0, 1]")
        if not 0.0 < self.mlp_ratio <= 4.0:
            raise PrunerConfigError(f"mlp_ratio {self.mlp_ratio} is outside (0, 4]")
        if self.input_norm not in INPUT_NORMS:
            raise PrunerConfigError(f"input_norm {self.input_norm!r} is not one of {', '.join(INPUT_NORMS)}")
        if self.query and self.input_norm != "rms":
            raise PrunerConfigError("query scorers read RMS-normalised states: set input_norm to 'rms'")
        for spec in self.features:
            try:
                parse_feature(spec)
            except ValueError as e:
                raise PrunerConfigError(str(e)) from e
        if len(set(self.features)) != len(self.features) or self.feature_window < 1:
            raise PrunerConfigError(
                f"features must be distinct and feature_window >= 1, got {self.features}, {self.feature_window}"
            )

    def check_model(self, model_config) -> None:
        """Raise if this pruner was built for a model of another shape than ``model_config``."""
        h, n = model_config.hidden_size, model_config.num_hidden_layers
        if (h, n) != (self.hidden_size, self.num_hidden_layers):
            raise PrunerConfigError(
                f"this pruner was built for hidden_size={self.hidden_size}, {self.num_hidden_layers} layers, "
                f"but the model has hidden_size={h}, {n} layers"
            )

    def layer_keep_ratio(self) -> list[float]:
        """Fraction of the original tokens each decoder layer processes under this schedule."""
        ratios, current = [], 1.0
        stage_of = dict(zip(self.layers, self.keep_ratios))
        for layer in range(self.num_hidden_layers):
            current = stage_of.get(layer, current)
            ratios.append(current)
        return ratios

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / CONFIG_NAME).write_text(json.dumps({"sdtp_pruner": True, **self.to_dict()}, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> PrunerConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise PrunerConfigError(f"{path} not found: is {directory} a pruner directory?")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PrunerConfigError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, dict) or not data.pop("sdtp_pruner", False):
            raise PrunerConfigError(f"{path} is not an sdtp pruner config")
        try:
            return cls(**data)
        except TypeError as e:
            raise PrunerConfigError(f"{path} has unexpected fields: {e}") from e

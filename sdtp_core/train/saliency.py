"""Stage 1: gradient-times-input token saliency of the frozen, unpruned model (paper eq. 3).

For a sample with prompt tokens followed by target (response) tokens, and each pruning layer ``l``,

    saliency[l, t] = sum_d  dL/dh_l[t, d] * h_l[t, d]

where ``h_l`` is the *input* hidden state of decoder layer ``l`` (the output of layer ``l - 1``: what
the stage-``l`` scorer sees) and ``L`` is the mean next-token cross-entropy over the sample's target
tokens (the response). Taking ``L`` over the response, not the whole text, makes the saliency of a
prompt token measure how much it matters for answering, which is what pruning the prompt must keep.
One backward pass per sample gives every layer (``torch.autograd.grad`` w.r.t. all captured inputs).

Storage (under the saliency directory, default ``OUT/saliency``):

* ``meta.json``: what the saliency was computed with (model shape, layers, data, format, max length).
* ``shard-r<rank>-<seq>.safetensors``: per sample ``ids.<id>`` (int32 tokens), ``sal.<id>`` (fp16,
  layers x tokens, each layer divided by its max ``|saliency|``) and ``scale.<id>`` (fp32 per-layer
  max), the signed saliency being ``sal * scale``. Header metadata lists the samples and prompt lengths.
  Shards are written to a temporary name and renamed, so a killed run leaves only complete shards;
  rerunning skips the samples already stored.
* ``index.json``: shard -> samples, written when all samples are done.

The per-layer summary is the paper's sparsity statistic: the fraction of a sample's prompt tokens
whose ``|saliency|`` exceeds 10% of the largest ``|saliency|`` among them, averaged over samples.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sdtp_core.attention import layout_mask
from sdtp_core.train.data import Example, collate
from sdtp_core.train.masked_forward import decoder_parts, lm_loss_from_hidden

META_NAME = "meta.json"
INDEX_NAME = "index.json"
SUMMARY_NAME = "saliency_summary.json"
PLOT_NAME = "saliency_summary.png"
_SHARD_RE = re.compile(r"shard-r(\d+)-(\d+)\.safetensors$")


class SaliencyMismatchError(ValueError):
    """Stored saliency does not match the model, the pruning layers or the samples in use."""


@torch.enable_grad()  # needs autograd even if the caller disabled it
def compute_saliency(model, input_ids: torch.Tensor, labels: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """Gradient-times-input saliency of every token at the input of each of ``layers``.

    Args:
        model: frozen causal LM (Llama/Qwen2 layout); its parameters need not require grad.
        input_ids: (batch, n) right-padded token ids.
        labels: (batch, n) next-token targets, -100 where not counted (see :class:`~.train_data.Batch`).
        layers: decoder layer indices (each in 1..num_layers-1), increasing.

    Returns:
        (batch, len(layers), n) fp32 saliency. The loss is the *sum* over samples of each sample's mean
        target cross-entropy, so each sample's saliency is that of its own mean loss (samples do not
        interact: attention is causal and padding sits on the right).
    """
    inner, _ = decoder_parts(model)
    first = layers[0]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    # Plain causal attention (right padding never reaches a real token); eager attention needs it explicitly.
    causal = layout_mask(
        torch.ones_like(input_ids, dtype=torch.bool),
        input_ids.shape[1],
        model.config._attn_implementation or "eager",
        model.dtype,
    )
    captured: list[torch.Tensor] = []
    with torch.no_grad():
        hidden = inner.embed_tokens(input_ids)
        rope = inner.rotary_emb(hidden, positions)
        for layer in inner.layers[:first]:
            hidden = layer(hidden, attention_mask=causal, position_embeddings=rope)
    hidden = hidden.detach().requires_grad_(True)
    wanted = set(layers)
    with torch.enable_grad():
        for i in range(first, len(inner.layers)):
            if i in wanted:
                captured.append(hidden)
            hidden = inner.layers[i](hidden, attention_mask=causal, position_embeddings=rope)
        loss = lm_loss_from_hidden(model, hidden, labels).sum()
        grads = torch.autograd.grad(loss, captured)
    return torch.stack([(g.float() * h.detach().float()).sum(-1) for g, h in zip(grads, captured)], dim=1)


def sparsity_fraction(saliency: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Fraction of tokens with ``|s| > threshold * max|s|``, per row of ``saliency`` (..., n)."""
    a = saliency.abs()
    return (a > threshold * a.amax(-1, keepdim=True)).float().mean(-1)


@dataclass
class StoredSample:
    """One sample read back from the store: tokens, signed fp32 saliency (layers x n), prompt length."""

    ids: torch.Tensor
    saliency: torch.Tensor
    prompt_len: int


class SaliencyStore:
    """Read/write access to a saliency directory (see the module docstring for the layout)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._handles: dict[str, object] = {}
        self._where: dict[int, str] = {}
        self._prompt_len: dict[int, int] = {}
        self.meta: dict | None = None
        if (self.directory / META_NAME).is_file():
            self.meta = json.loads((self.directory / META_NAME).read_text())
        self.refresh()

    # -- writing ---------------------------------------------------------------------------------
    def init(self, meta: dict) -> None:
        """Create the directory, or check that an existing one was made with the same ``meta``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.directory / META_NAME).is_file():  # possibly written by another process meanwhile
            self.meta = json.loads((self.directory / META_NAME).read_text())
        if self.meta is not None:
            differing = sorted(k for k in set(meta) | set(self.meta) if meta.get(k) != self.meta.get(k))
            if differing:
                details = ", ".join(f"{k}: stored {self.meta.get(k)!r} vs now {meta.get(k)!r}" for k in differing)
                raise SaliencyMismatchError(
                    f"{self.directory} holds saliency computed with other settings ({details}); "
                    "use another --out / --saliency-dir or delete it"
                )
            return
        tmp = self.directory / (META_NAME + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, self.directory / META_NAME)
        self.meta = meta

    def write_shard(self, rank: int, samples: list[tuple[Example, torch.Tensor]]) -> Path:
        """Atomically write one shard holding ``(example, saliency (layers, n))`` pairs."""
        matches = [_SHARD_RE.match(p.name) for p in self.directory.iterdir()]
        seqs = [int(m.group(2)) for m in matches if m and int(m.group(1)) == rank]
        path = self.directory / f"shard-r{rank:02d}-{max(seqs, default=-1) + 1:05d}.safetensors"
        tensors, ids, prompt_lens = {}, [], []
        for example, sal in samples:
            scale = sal.abs().amax(-1).clamp(min=1e-30)
            sid = example.sample_id
            tensors[f"ids.{sid}"] = torch.tensor(example.ids, dtype=torch.int32)
            tensors[f"sal.{sid}"] = (sal / scale[:, None]).to(torch.float16).contiguous()
            tensors[f"scale.{sid}"] = scale.float().contiguous()
            ids.append(sid)
            prompt_lens.append(example.prompt_len)
        metadata = {"samples": json.dumps(ids), "prompt_lens": json.dumps(prompt_lens)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    def write_index(self) -> None:
        self.refresh()
        shards: dict[str, list[int]] = {}
        for sid, name in sorted(self._where.items()):
            shards.setdefault(name, []).append(sid)
        tmp = self.directory / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps({"num_samples": len(self._where), "shards": shards}, indent=1))
        os.replace(tmp, self.directory / INDEX_NAME)

    # -- reading ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rescan the complete shards on disk."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.iterdir()):
            if not _SHARD_RE.match(path.name) or path.name in self._handles:
                continue
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata() or {}
            for sid, plen in zip(json.loads(meta["samples"]), json.loads(meta["prompt_lens"])):
                self._where[int(sid)] = path.name
                self._prompt_len[int(sid)] = int(plen)
            self._handles[path.name] = handle

    @property
    def done(self) -> set[int]:
        return set(self._where)

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"]) if self.meta else []

    def get(self, sample_id: int) -> StoredSample:
        """The stored tokens, signed fp32 saliency (layers, n) and prompt length of one sample."""
        if sample_id not in self._where:
            raise SaliencyMismatchError(f"no saliency stored for sample {sample_id} in {self.directory}")
        h = self._handles[self._where[sample_id]]
        sal = h.get_tensor(f"sal.{sample_id}").float() * h.get_tensor(f"scale.{sample_id}")[:, None]
        return StoredSample(h.get_tensor(f"ids.{sample_id}").long(), sal, self._prompt_len[sample_id])

    def check(self, model_config, layers: list[int], examples: list[Example], model_name: str | None = None) -> None:
        """Raise :class:`SaliencyMismatchError` naming the problem if this store cannot supervise
        training of a pruner at ``layers`` of this model on ``examples``."""
        if self.meta is None:
            raise SaliencyMismatchError(
                f"{self.directory} holds no saliency ({META_NAME} missing): run the 'saliency' stage first"
            )
        shape = {
            "num_hidden_layers": model_config.num_hidden_layers,
            "hidden_size": model_config.hidden_size,
            "vocab_size": model_config.vocab_size,
        }
        for key, value in shape.items():
            if self.meta.get(key) != value:
                raise SaliencyMismatchError(
                    f"saliency in {self.directory} was computed for a model with {key}={self.meta.get(key)}, "
                    f"but this model has {key}={value}"
                )
        stored_name = self.meta.get("model")
        if model_name is not None and stored_name and Path(stored_name).name != Path(model_name).name:
            raise SaliencyMismatchError(
                f"saliency in {self.directory} was computed with model {stored_name!r}, not {model_name!r}"
            )
        missing_layers = [layer for layer in layers if layer not in self.layers]
        if missing_layers:
            raise SaliencyMismatchError(
                f"saliency in {self.directory} covers layers {self.layers}, not the pruning layers {missing_layers}"
            )
        missing = [e.sample_id for e in examples if e.sample_id not in self._where]
        if missing:
            raise SaliencyMismatchError(
                f"saliency in {self.directory} lacks {len(missing)} of the {len(examples)} training samples "
                f"(first: {missing[:5]}); rerun the 'saliency' stage with the same data settings"
            )
        for e in examples:
            stored = self.get(e.sample_id)
            if stored.ids.tolist() != e.ids or stored.prompt_len != e.prompt_len:
                raise SaliencyMismatchError(
                    f"sample {e.sample_id}: stored tokens differ from the current tokenization "
                    "(another tokenizer, --format, --max-length or data file?)"
                )


def summarize(store: SaliencyStore, examples: list[Example], out_dir: Path) -> dict:
    """Write the per-layer sparsity summary (JSON + PNG) to ``out_dir`` and return it."""
    per_layer = torch.zeros(len(store.layers))
    for e in examples:
        stored = store.get(e.sample_id)
        per_layer += sparsity_fraction(stored.saliency[:, : stored.prompt_len])
    per_layer /= max(1, len(examples))
    summary = {
        "statistic": "fraction of prompt tokens with |saliency| > 10% of the sample's max |saliency| "
        "at that layer, averaged over samples",
        "num_samples": len(examples),
        "layers": store.layers,
        "fraction_above_10pct_of_max": [round(float(x), 6) for x in per_layer],
    }
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([str(x) for x in store.layers], per_layer.tolist(), color="tab:blue")
    ax.set_xlabel("layer (input hidden state)")
    ax.set_ylabel("fraction > 10% of max |saliency|")
    ax.set_title(f"Token saliency sparsity ({len(examples)} samples)")
    fig.tight_layout()
    fig.savefig(out_dir / PLOT_NAME, dpi=120)
    plt.close(fig)
    return summary


def run_saliency(
    model,
    examples: list[Example],
    layers: list[int],
    store: SaliencyStore,
    meta: dict,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
    shard_size: int = 64,
    pad_id: int = 0,
    show_progress: bool = True,
    barrier: Callable[[], None] | None = None,
) -> int:
    """Compute and store the saliency of every example not stored yet; returns how many this process did.

    Process ``rank`` of ``world_size`` takes every ``world_size``-th pending sample. Call ``barrier``
    (e.g. ``accelerator.wait_for_everyone``) so that the main process can write the index afterwards.
    """
    if rank == 0:
        store.init(meta)
    if barrier is not None:
        barrier()
    if rank != 0:
        store.init(meta)  # re-read and check on the other processes
    store.refresh()
    done = store.done
    pending = [e for e in examples if e.sample_id not in done][rank::world_size]
    device = next(model.parameters()).device
    buffer: list[tuple[Example, torch.Tensor]] = []
    bar = tqdm(total=len(pending), desc=f"saliency (rank {rank})", unit="sample", disable=not show_progress)
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        batch = collate(chunk, pad_id).to(device)
        sal = compute_saliency(model, batch.input_ids, batch.labels, layers).cpu()
        buffer.extend((e, sal[row, :, : e.length]) for row, e in enumerate(chunk))
        if len(buffer) >= shard_size:
            store.write_shard(rank, buffer)
            buffer = []
        bar.update(len(chunk))
    if buffer:
        store.write_shard(rank, buffer)
    bar.close()
    if barrier is not None:
        barrier()
    store.refresh()
    if rank == 0:
        store.write_index()
    return len(pending)

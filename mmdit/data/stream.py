"""Streamed training data (data.streaming=true): batches drawn from per-process shards of a dataset that is
never all in memory, with a position a checkpoint can hold; and the latent cache of a streamed split, built by
every process from its own part of the stream."""
from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

import torch
from datasets.distributed import split_dataset_by_node

from mmdit import latents
from mmdit.data import DataConfig
from mmdit.data.loader import DataError, StreamingImageCaptions, iter_examples, open_split
from mmdit.shards import ShardStore
from mmdit.text_encoder import CaptionCache
from mmdit.vqvae import VQVAE

STREAM_CAPTIONS = 8  # candidate captions kept per row of a streamed split (its longest list is not known up front)


class StreamBatches:
    """`get_batch` for data.streaming=true: batches of uint8 images (B, 3, R, R) from one stream per shard this
    process draws (one per accumulation micro-batch), each a disjoint part of the dataset (datasets'
    split_dataset_by_node), epoch after epoch. Its position (datasets' state_dict) is checkpointed, so a
    resumed run continues where it stopped; datasets refills the shuffle buffer on resume, so this resume is
    close, not bitwise exact like the in-memory one."""

    def __init__(self, cfg: DataConfig, split: str, shards: range, num_shards: int, batch_size: int):
        self.streams = {s: StreamingImageCaptions(cfg, split, s, num_shards) for s in shards}
        self.batch_size = batch_size
        self.iters: dict = {}  # shard -> its running iterator (absent at the start of an epoch)
        self.in_epoch: dict = {}  # shard -> images it yielded in this epoch (0 at the end: an empty shard)
        self.restored: dict = {}  # shard -> the state loaded from a checkpoint, until it is iterated again

    def __call__(self, step: int, shard: int, num_shards: int) -> torch.Tensor:
        stream, images = self.streams[shard], []
        self.restored.pop(shard, None)
        while len(images) < self.batch_size:
            if shard not in self.iters:
                self.iters[shard], self.in_epoch[shard] = iter(stream), 0
            image = next(self.iters[shard], None)
            if image is None:  # the end of this shard's epoch; the next one is reshuffled
                if self.in_epoch[shard] == 0:
                    raise DataError(f"shard {shard} of {num_shards} of the streamed split has no usable images; "
                                    "accepted: a dataset with at least as many files as shards, or fewer processes")
                del self.iters[shard]
                stream.set_epoch(stream.epoch + 1)
                continue
            self.in_epoch[shard] += 1
            images.append(image)
        return torch.stack(images)

    def state_dict(self) -> dict:
        return {str(s): self.restored.get(s) or (stream.ds.state_dict() if s in self.iters else {"epoch": stream.epoch})
                for s, stream in self.streams.items()}

    def load_state_dict(self, state: dict) -> None:
        for s, stream in self.streams.items():
            self.restored[s] = state[str(s)]
            self.iters.pop(s, None)
            stream.set_epoch(state[str(s)]["epoch"])
            if "examples_iterable" in state[str(s)]:  # else the epoch had not started
                stream.ds.load_state_dict(state[str(s)])


@torch.no_grad()
def fill_stream(vqvae: VQVAE, cfg: DataConfig, split: str, store: ShardStore, cache: CaptionCache, rank: int = 0,
                world_size: int = 1, shard_rows: int = latents.SHARD_ROWS, caption_base: int | None = None) -> int:
    """The latent cache of a streamed split, built by every process from its own part of the stream
    (split_dataset_by_node), shard by shard as it goes (one shard of images in memory at a time). Process
    `rank`'s k-th shard holds rows from (k * world_size + rank) * shard_rows on: no process waits for another's
    count, and the row space has a gap after each process's last, short shard, which readers skip
    (ShardReader.dense). A shard already complete is not encoded again. With `caption_base`, the captions are
    not read up front: each shard's new captions are encoded into the caption cache as it goes, at caption rows
    from caption_base on, laid out like the shards (stride: shard_rows x candidates per row).
    -> the number of shards encoded."""
    width, encoded = store.columns["captions"][0][0], 0
    part = split_dataset_by_node(open_split(dataclasses.replace(cfg, streaming=True), split), rank, world_size)
    rows = iter_examples(part, cfg, Counter(), desc="" if rank else f"latent cache: {split}")
    images, captions, columns, k = [], [], {}, 0  # the shard being filled
    for image, caps, extra in itertools.chain(rows, [(None, None, None)]):
        if image is not None:
            images.append(image)
            captions.append(caps)
            for key, value in extra.items():
                columns.setdefault(key, []).append(value)
        if len(images) == shard_rows or (image is None and images):
            start = (k * world_size + rank) * shard_rows
            if not store.complete(start, start + len(images), verify=True, sidecar=True):
                if caption_base is not None:
                    cache.encode_at([c for caps in captions for c in caps[:width]], caption_base + start * width)
                store.write(start, {"indices": latents.encode_images(vqvae, torch.stack(images)),
                                    "captions": latents.candidate_rows(captions, cache, width)},
                            sidecar={"captions": captions, "columns": columns})
                encoded += 1
            images, captions, columns, k = [], [], {}, k + 1
    return encoded

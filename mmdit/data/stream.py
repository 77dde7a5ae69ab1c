"""Streamed training data (data.streaming=true): batches drawn from per-process shards of a dataset that is
never all in memory, with a position a checkpoint can hold; and the latent cache of a streamed split."""
from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from mmdit import latents
from mmdit.data import DataConfig
from mmdit.data.loader import DataError, ImageCaptions, StreamingImageCaptions, iter_examples, open_split
from mmdit.vqvae import VQVAE


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
def encode_stream(vqvae: VQVAE, cfg: DataConfig, split: str) -> tuple[torch.Tensor, ImageCaptions]:
    """The latent cache of a streamed split, 256 images at a time: code indices (N, h, w) and the captions and
    columns of each row (an ImageCaptions without images); the split's images are never all in memory."""
    indices, captions, columns, chunk = [], [], {}, []
    rows = iter_examples(open_split(dataclasses.replace(cfg, streaming=True), split), cfg, Counter(),
                         desc=f"latent cache: {split}")
    for image, caps, extra in rows:
        chunk.append(image)
        captions.append(caps)
        for key, value in extra.items():
            columns.setdefault(key, []).append(value)
        if len(chunk) == 256:
            indices.append(latents.encode_images(vqvae, torch.stack(chunk)))
            chunk = []
    if chunk:
        indices.append(latents.encode_images(vqvae, torch.stack(chunk)))
    return torch.cat(indices), ImageCaptions(torch.empty(0, 3, 0, 0, dtype=torch.uint8), captions, columns)

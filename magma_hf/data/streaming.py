"""MAGMA's training stream: shards read where they lie, split over processes and data-loader workers, shuffled,
mixed, and resumable at the exact sample.

[`MagmaStream`] is a `torch.utils.data.IterableDataset` over one or more [`ShardSource`]s (`magma_hf.data.shards`).

- **Sharding.** Data-loader worker `w` of process `r` (of `P` processes with `N` workers each) is reader
  `g = r * N + w` of `G = P * N`. In each pass over a source its shards, in a shuffled order, are dealt round-robin:
  reader `g` reads shards `g, g + G, g + 2G, ...`. Every sample is read by exactly one reader per pass; a shard count
  that `G` does not divide leaves some readers one shard more. With fewer shards than readers each shard is cut into
  `ceil(G / shards)` interleaved parts (reader parts keep samples `part, part + parts, ...` of the shard), so every
  reader has work and still no sample is read twice; each of those readers reads the whole shard's bytes, so the
  cost is extra reading, which a warning names (write more shards: img2dataset's `--number_sample_per_shard`).
- **Shuffling.** Shard order is shuffled per pass (`seed`, pass number); each reader's samples are shuffled in
  windows of `shuffle_buffer_size` consecutive samples (a permutation seeded by `seed`, pass, reader and window).
  Deterministic for a given seed and process/worker count; `shuffle_buffer_size: 0` reads in order.
- **Passes.** With `repeat` (training) each source starts its next pass, reshuffled, when it runs out, so the stream
  never ends and the run stops at `train_steps`. Without it the stream is one pass.
- **Mixing.** Several sources are drawn by `weights` (probabilities, normalised): each sample comes from source `i`
  with probability `weights[i]`, drawn by a seeded generator per reader. Repeating sources never run dry, so the
  proportions hold for the whole run (a small source is seen more often, as `datasets.interleave_datasets` with
  `stopping_strategy="all_exhausted"`). Without `repeat` the mix stops when its first source runs out
  (`"first_exhausted"`).
- **Resuming.** `state_dict()` is the position of this reader in every source (pass, shard, window, samples taken)
  and in the mix; `load_state_dict` restarts there exactly: the window in progress is read again from its first
  sample and permuted as before. `torchdata`'s `StatefulDataLoader` calls both in each worker.
- **Bad samples.** Each sample is decoded by MAGMA's one decoder (`decoding.decode_image`, `clean_captions`). A
  sample that cannot be used is not dropped silently: it is yielded with `image=None` and `problem` saying why, so
  the collator skips it and the trainer counts it against `max_skipped_share` as it counts undecodable images of a
  map-style dataset.

Rows are the map-style readers' (`image`, `image_path`, `captions`, `metadata`) plus `key` (unique in the stream:
`<source index>:<shard name>/<sample key>`) and `problem`. With `pick_caption` a training row carries one caption,
chosen by a generator seeded with `seed`, pass and key, so the choice does not depend on which worker read it.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from transformers.utils import logging

from .decoding import caption_problem, clean_captions, decode_image, is_main_local_process
from .shards import HubShards, MapShards, RawSample, ShardSource, open_shards
from .sources import SourceSpec, load_image_caption_dataset, parse_source

logger = logging.get_logger(__name__)

DEFAULT_SHUFFLE_BUFFER_SIZE = 1000
# A reader whose shards of a pass are all empty goes on to the next pass, where the shards are dealt anew; this many
# empty passes in a row (or the reader count, if larger) means the source has too little data for its readers.
MAX_EMPTY_PASSES = 16
_MIX_BLOCK = 4096  # mix draws made at once, from a generator seeded by (seed, reader, block)
# Where one reader is in one source, at the start of a pass: pass, index into its shard parts, the shard position its
# current window starts at, the window's number in the pass and how many of the window's samples it has yielded.
_CURSOR_START = {"epoch": 0, "part": 0, "position": 0, "window": 0, "taken": 0}


def _parts(shards: int, readers: int) -> int:
    """Into how many interleaved parts each shard is cut so that every reader has at least one."""
    return max(1, math.ceil(readers / shards))


def decode_sample(raw: RawSample, source: ShardSource) -> dict:
    """A [`RawSample`] as a MAGMA row: decoded by MAGMA's one decoder; a sample that cannot be used keeps
    `image=None` and says why in `problem`."""
    label = f"{source.name}: {raw.key}"
    row = {"key": raw.key, "image_path": label, "metadata": json.dumps(raw.metadata, default=str), "problem": None}
    problem = raw.problem or caption_problem(raw.captions)
    captions = None if problem else clean_captions(raw.captions)
    if problem is None and captions is None:
        problem = "no captions"
    image = None
    if problem is None:
        value = raw.image if isinstance(raw.image, dict) else {"bytes": raw.image, "path": None}
        image, error = decode_image(value)
        problem = None if image is not None else f"cannot decode the image: {error}"
    return {**row, "image": image, "captions": captions or [], "problem": problem}


class MagmaStream(torch.utils.data.IterableDataset):
    """Image-caption rows streamed from shards; see the module docstring for sharding, shuffling, mixing and resume.

    Args:
        sources: The [`ShardSource`]s.
        weights: Sampling probability of each source (normalised); defaults to equal.
        seed: Seeds the shard orders, the windows, the mix and the caption choice.
        shuffle_buffer_size: Samples per shuffling window; 0 reads each reader's shards in order.
        repeat: Start another pass when a source runs out (training); otherwise one pass.
        pick_caption: Keep one caption per row, chosen deterministically (training); otherwise all of them.
    """

    def __init__(
        self, sources: Sequence[ShardSource], weights: Sequence[float] | None = None, *, seed: int = 0,
        shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE, repeat: bool = True, pick_caption: bool = True,
    ):
        if not sources:
            raise ValueError("A stream needs at least one source")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"{len(weights)} weights for {len(sources)} sources: give one weight per source")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"Source weights must be non-negative numbers with a positive sum, got {weights}")
        if shuffle_buffer_size < 0:
            raise ValueError(f"shuffle_buffer_size must be >= 0, got {shuffle_buffer_size}")
        self.sources = list(sources)
        self.weights = [w / sum(weights) for w in weights]
        self.seed, self.shuffle_buffer_size = seed, shuffle_buffer_size
        self.repeat, self.pick_caption = repeat, pick_caption
        self.rank, self.world_size = 0, 1
        self._state: dict | None = None  # restored by load_state_dict, applied by the next __iter__
        self._live: dict | None = None

    # ---- placement ----

    def distribute(self, rank: int, world_size: int) -> MagmaStream:
        """Read as process `rank` of `world_size` (set before the data loader is made: workers get a copy)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        return self

    def _reader(self) -> tuple[int, int]:
        """`(this reader's number, number of readers)` over all processes and data-loader workers."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def check_readers(self, num_workers: int) -> None:
        """Warn, naming the counts, when a source has fewer shards than there are readers (see the module docstring)."""
        readers = self.world_size * max(1, num_workers)
        for source in self.sources:
            if len(source) < readers and is_main_local_process() and self.rank == 0:
                logger.warning(
                    f"{source.name} has {len(source)} shards for {readers} readers ({self.world_size} processes x "
                    f"{max(1, num_workers)} data-loader workers): each shard is split {_parts(len(source), readers)} "
                    "ways by sample, so several readers read each shard's bytes. Write more shards (img2dataset "
                    "--number_sample_per_shard) or use fewer workers"
                )

    # ---- state ----

    def state_dict(self) -> dict:
        """This reader's position (after the last row it yielded), for `torchdata`'s `StatefulDataLoader`."""
        if self._live is not None:
            return json.loads(json.dumps(self._live))
        return self._state or {}

    def load_state_dict(self, state: dict) -> None:
        self._state = dict(state) if state else None

    def layout(self, processes: int, num_workers: int) -> dict:
        """What a saved position depends on, each changing which samples a reader reads: processes x data-loader
        workers (the readers the shards are dealt to), the seed, the shards per source and the shuffle buffer."""
        return {
            "processes": processes,
            "dataloader_num_workers": num_workers,
            "seed": self.seed,
            "shards": [len(source) for source in self.sources],
            "shuffle_buffer_size": self.shuffle_buffer_size,
        }

    def _placement(self) -> dict:
        reader, readers = self._reader()
        info = torch.utils.data.get_worker_info()
        return {"reader": reader, "readers": readers, **self.layout(self.world_size, info.num_workers if info else 0)}

    def _initial_state(self) -> dict:
        placement = self._placement()
        state = self._state
        if state:
            if state.get("placement") != placement:
                raise ValueError(
                    f"Cannot resume this data stream: it was saved as {state.get('placement')} and is now read as "
                    f"{placement}. Resume with the same processes, dataloader_num_workers, seed, shuffle buffer and "
                    "data"
                )
            self._state = None  # used once: a later pass over a one-pass stream starts from its beginning
            return json.loads(json.dumps(state))
        return {"placement": placement, "draws": 0, "cursors": [dict(_CURSOR_START) for _ in self.sources]}

    # ---- reading ----

    def _order(self, source: int, epoch: int, reader: int, readers: int) -> list[tuple[int, int, int]]:
        """This reader's shard parts `(shard, part, parts)` of a pass, in reading order."""
        count = len(self.sources[source])
        parts = _parts(count, readers)
        everything = [(shard, part, parts) for shard in range(count) for part in range(parts)]
        if self.shuffle_buffer_size:
            random.Random(f"{self.seed}:{source}:{epoch}:order").shuffle(everything)
        return everything[reader::readers]

    def _samples(self, source: int, order, part_index: int, position: int) -> Iterator[tuple[int, RawSample]]:
        """`(part index, sample)` of this reader from `order[part_index]` at shard position `position` on."""
        for index in range(part_index, len(order)):
            shard, part, parts = order[index]
            start = position if index == part_index else 0
            for raw in self.sources[source].read(shard, start):
                if raw.position % parts == part:
                    yield index, raw

    def _source_rows(self, source: int, cursor: dict, reader: int, readers: int) -> Iterator[dict]:
        """The rows of one source for this reader, from `cursor` on, updating it as each row is handed out."""
        size = self.shuffle_buffer_size or 1
        empty_passes = 0  # passes in a row in which this reader's shards held nothing (img2dataset writes empty tars)
        while True:
            order = self._order(source, cursor["epoch"], reader, readers)
            has_samples = False
            samples = self._samples(source, order, cursor["part"], cursor["position"])
            while True:
                window = [item for _, item in zip(range(size), samples)]
                if not window:
                    break
                has_samples = True
                permutation = list(range(len(window)))
                if self.shuffle_buffer_size:
                    key = f"{self.seed}:{source}:{cursor['epoch']}:{reader}:{cursor['window']}"
                    random.Random(key).shuffle(permutation)
                following = next(samples, None)  # where the next window starts (read ahead by one sample)
                for slot in permutation[cursor["taken"] :]:
                    cursor["taken"] += 1
                    yield self._row(source, cursor["epoch"], window[slot][1])
                if following is None:
                    break
                cursor.update(part=following[0], position=following[1].position, window=cursor["window"] + 1, taken=0)
                samples = itertools.chain([following], samples)
            if not self.repeat:
                return
            empty_passes = 0 if has_samples else empty_passes + 1
            if empty_passes > max(MAX_EMPTY_PASSES, readers):
                raise ValueError(
                    f"{self.sources[source].name}: reader {reader} of {readers} (processes x data-loader workers) got "
                    f"no sample in {empty_passes} passes in a row over its {len(self.sources[source])} shards: they "
                    "hold fewer samples than there are readers, or are empty. Use fewer processes or "
                    "dataloader_num_workers"
                )
            cursor.update(_CURSOR_START, epoch=cursor["epoch"] + 1)

    def _row(self, source: int, epoch: int, raw: RawSample) -> dict:
        row = decode_sample(raw, self.sources[source])
        row["key"] = f"{source}:{raw.key}"
        if self.pick_caption and len(row["captions"]) > 1:
            row["captions"] = [random.Random(f"{self.seed}:{epoch}:{row['key']}").choice(row["captions"])]
        return row

    def _mix_choices(self, reader: int, block: int) -> np.ndarray:
        generator = np.random.default_rng([self.seed, reader, block])
        return generator.choice(len(self.sources), size=_MIX_BLOCK, p=self.weights)

    def __iter__(self) -> Iterator[dict]:
        state = self._initial_state()
        self._live = state
        reader, readers = state["placement"]["reader"], state["placement"]["readers"]
        streams = [self._source_rows(i, state["cursors"][i], reader, readers) for i in range(len(self.sources))]
        if len(streams) == 1:
            yield from streams[0]
            return
        block, choices = None, None
        while True:
            if state["draws"] // _MIX_BLOCK != block:
                block = state["draws"] // _MIX_BLOCK
                choices = self._mix_choices(reader, block)
            row = next(streams[choices[state["draws"] % _MIX_BLOCK]], None)
            if row is None:
                return  # one pass, and this source ran out: the mix stops ("first_exhausted")
            state["draws"] += 1
            yield row


def open_source(spec: SourceSpec) -> ShardSource:
    """The [`ShardSource`] of a source: its shards, a 🤗 dataset streamed, or a map-style folder cut into ranges (for
    a mix that streams)."""
    if spec.layout in ("webdataset", "parquet"):
        return open_shards(spec.path, spec.image_column, spec.caption_column)
    if spec.layout == "hub":
        return HubShards(spec.path, spec.split, spec.image_column or "image", spec.caption_column)
    options = {"path": spec.path, "format": spec.layout, "split": spec.split, "image_column": spec.image_column}
    return MapShards(spec.path, load_image_caption_dataset({**options, "caption_column": spec.caption_column}))


def build_stream(
    sources, weights: Sequence[float] | None = None, streaming: bool | None = None, **stream_options
) -> MagmaStream | None:
    """A [`MagmaStream`] over `sources` (a path, a source dict or a list of them; see `sources.parse_source`), or
    `None` when they are read map-style: no source streams and no `weights` ask for a mix. A mix streams every
    source in it, a map-style folder as ranges of its rows."""
    items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    if weights is not None and len(weights) != len(items):
        raise ValueError(f"{len(weights)} weights for {len(items)} dataset sources: give one weight per source")
    specs = [parse_source(item, streaming) for item in items]
    if weights is None and not any(spec.streaming for spec in specs):
        return None
    return MagmaStream([open_source(spec) for spec in specs], weights, **stream_options)


__all__ = ["DEFAULT_SHUFFLE_BUFFER_SIZE", "MagmaStream", "build_stream", "decode_sample", "open_source"]

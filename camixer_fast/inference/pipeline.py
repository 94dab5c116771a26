"""The pipelined runner behind ``camixer-fast upscale`` and :func:`upscale_batch`: many images
(or video frames) through the network with the model never waiting on I/O.

Stages, each on its own threads::

    items --prepare (pool)--> size buckets --batches--> model workers --finish (pool)--> outcomes

- *prepare* turns an item into a :class:`~camixer_fast.inference.api.Prepared` (read and decode a
  file, check an array) on a small thread pool, ahead of the model;
- images of the same size are grouped into batches of up to ``batch_size`` (images that are
  tiled go alone, their same-size tiles grouped instead);
- each model worker holds its own copy of the network and runs a batch at a time. Routing is
  per image, and on the CPU backend the network runs a batch image by image
  (:meth:`CAMixerSR.forward`), so no output depends on which images shared its batch, on the
  batch size, on the number of workers or on the order;
- *finish* (rebuild the image's kind, then the caller's ``sink``, e.g. encode and write a file)
  runs on another pool, behind the model.

An allocation failure on a batch reruns its images one by one, and on an image halves the tile
and retries it (:func:`camixer_fast.inference.tiling.run_network`); the outcome's ``notes`` say so.

CPU threads: every image is computed with ``threads`` intra-op threads (``torch.set_num_threads``
for the length of the run) and ``workers`` images are in flight at once. The CPU kernels round
differently with the thread count (by ~1e-6, one 8-bit level on ~1e-5 of the pixels), so an
output is bit-identical for a given ``threads`` whatever the batching, the workers and the order.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from camixer_fast.inference.api import ImageLike, Prepared, cached_model, check_tile, prepare, resolve_device, resolve_dtype
from camixer_fast.inference.tiling import (auto_tile, available_memory, forward_bytes,
                                           is_allocation_failure, memory_use, run_network)
from camixer_fast.reference.routing import check_gamma

MAX_AUTO_BATCH = 8
"""Largest batch that ``batch_size=None`` picks."""

DECODE_THREADS = 2
"""Threads that prepare (read, decode) items ahead of the model."""

FINISH_THREADS = 2
"""Threads that finish results (rebuild, encode, write) behind the model."""


def default_workers(device: torch.device) -> int:
    """Images in flight through the network at once by default: 1, with all of torch's
    intra-op threads, so that results equal :func:`camixer_fast.upscale`'s at its defaults
    (and the sequential command's) bit for bit. More workers at fewer threads each
    (``workers=N, threads=1``) use many cores better on small images, with results that differ
    by the thread count's rounding (see the module's docstring)."""
    return 1


class Engine:
    """The network, ready to run batches on one device from several worker threads.

    Arguments as :func:`camixer_fast.upscale` takes them, plus:

    batch_size: images (or tiles) per model call; None sizes it from memory (as many as
      fit in the budget of :func:`camixer_fast.inference.tiling.auto_tile` if run at once, at most
      :data:`MAX_AUTO_BATCH`).
    workers: model workers (each with its own copy of the network); None:
      :func:`default_workers`.
    threads: CPU intra-op threads per image; None: ``torch.get_num_threads() // workers``
      (at least 1). Outputs depend on it (see the module's docstring), not on the rest.

    Raises what :func:`camixer_fast.load_model` raises for bad weights, ValueError for bad
    settings.
    """

    def __init__(self, gamma: float = 0.5, *, weights: str | os.PathLike | Mapping = "CAMixerSR-S",
                 tile: int | str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None, backend: str = "auto",
                 batch_size: int | None = None, workers: int | None = None,
                 threads: int | None = None) -> None:
        self.gamma = check_gamma(gamma)
        self.tile = check_tile(tile)
        self.dtype = resolve_dtype(dtype)
        self.device = resolve_device(device)
        for name, value in (("batch_size", batch_size), ("workers", workers),
                            ("threads", threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.batch_size = batch_size
        self.workers = workers or default_workers(self.device)
        self.threads = threads or max(1, torch.get_num_threads() // self.workers)
        self._room = Room(int(memory_use(self.device).fraction
                               * available_memory(self.device)))
        with _one_thread():
            base = cached_model(weights, self.device, self.dtype, backend).model
            self.scale = base.scale
            self.models = []
            for _ in range(self.workers):
                model = copy.deepcopy(base)
                model.gamma = self.gamma
                self.models.append(model)

    def _budget(self) -> int:
        return int(memory_use(self.device).fraction * available_memory(self.device)
                   / self.workers)

    def tile_for(self, height: int, width: int) -> int | None:
        """The tile an image of this size runs with: ``tile``, or for "auto" what fits in this
        worker's share of the memory."""
        if self.tile == "auto":
            return auto_tile(height, width, scale=self.scale, device=self.device,
                             dtype=self.dtype, budget=self._budget())
        return self.tile

    def batch_for(self, height: int, width: int) -> int:
        """Images (or tiles) of this size per model call."""
        if self.batch_size is not None:
            return self.batch_size
        per_image = forward_bytes(height * width, device=self.device, dtype=self.dtype,
                                  outputs=height * width, scale=self.scale)
        return int(max(1, min(MAX_AUTO_BATCH, self._budget() // per_image)))

    def working_set(self, count: int, height: int, width: int, tile: int | None) -> int:
        """Bytes a batch of ``count`` images of this size is expected to take while it runs:
        one image's (or tile's) working set, the network computing them one by one, plus the
        float32 inputs and outputs of the batch."""
        pixels = min(tile, height) * min(tile, width) if tile else height * width
        return forward_bytes(pixels, device=self.device, dtype=self.dtype,
                             outputs=count * height * width, scale=self.scale) \
            + count * height * width * 3 * 4

    def run(self, worker: int, colour: Tensor, *,
            progress: Callable[[int, int], None] | None = None,
            on_retry: Callable[[int, str], None] | None = None) -> list[Tensor | BaseException]:
        """Super-resolve (B, 3, H, W) ``colour`` on worker ``worker``'s network: per image, its
        (1, 3, sH, sW) result clamped to [0, 1] on the CPU in float32, or the exception that
        image raised. ``on_retry(i, text)`` hears of out-of-memory retries of image i.

        Workers share the memory budget: a batch waits while others run and its
        :meth:`working_set` would not fit beside theirs (it runs at once when alone), so large
        images are computed one at a time and small ones side by side."""
        height, width = colour.shape[-2:]
        tile = self.tile_for(height, width)
        need = self.working_set(colour.shape[0], height, width, tile)
        with self._room.taking(need):
            return self._run(worker, colour, tile, progress, on_retry)

    def _run(self, worker: int, colour: Tensor, tile: int | None,
             progress: Callable[[int, int], None] | None,
             on_retry: Callable[[int, str], None] | None) -> list[Tensor | BaseException]:
        model = self.models[worker]
        height, width = colour.shape[-2:]
        count = colour.shape[0]
        with torch.inference_mode():
            x = colour.to(device=self.device, dtype=self.dtype)
            if count > 1 and tile is None:
                try:
                    out = model(x)
                    return [o[None].float().cpu().clamp(0, 1) for o in out]
                except Exception:  # noqa: BLE001 - rerun one by one, errors go to their image
                    pass
            tiles_per_call = 1
            if tile and (self.batch_size or self.device.type != "cpu"):
                # on the CPU the network runs a batch tile by tile anyway: one tile per call
                # lets an interrupt stop after the tile in progress
                tiles_per_call = self.batch_for(min(tile, height), min(tile, width))
            results: list[Tensor | BaseException] = []
            for i in range(count):
                retry = None if on_retry is None else (lambda text, i=i: on_retry(i, text))
                try:
                    out = run_network(model, x[i:i + 1], tile, batch=tiles_per_call,
                                      progress=progress, on_retry=retry)
                    results.append(out.float().cpu().clamp(0, 1))
                except Exception as err:  # noqa: BLE001 - reported per image
                    if is_allocation_failure(err) and self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    results.append(err)
            return results


class Cancelled(Exception):
    """Raised between tiles in a model worker when the run is stopping."""


def set_thread_count(threads: int) -> None:
    """This thread's torch intra-op threads, for good.

    A thread's first parallel operation sets its count to the last one any thread set
    (PyTorch's lazy initialisation), so a worker that set its own count and then ran after a
    finisher set 1 would compute at 1 thread (and round differently). Asking for the count
    first runs that initialisation now; the count set after it stays."""
    torch.get_num_threads()
    torch.set_num_threads(threads)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The calling thread's torch work at one intra-op thread, restored after.

    Loading the network on the caller's thread with several threads would give that thread an
    OpenMP team of its own, and while such a team exists the model workers' forwards (on other
    threads) ran slower (S at 128×128 on 2 cores, ``bench/cpu_host.py``: 216–221 against
    152–156 ms per forward)."""
    threads = torch.get_num_threads()
    set_thread_count(1)
    try:
        yield
    finally:
        set_thread_count(threads)


class Room:
    """A memory budget shared by the workers (bytes): :meth:`taking` waits until the amount
    fits beside what the others hold, or nobody holds anything."""

    def __init__(self, total: int) -> None:
        self.total, self.used, self.holders = total, 0, 0
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def taking(self, amount: int) -> Iterator[None]:
        with self.changed:
            self.changed.wait_for(lambda: self.holders == 0
                                  or self.used + amount <= self.total)
            self.used += amount
            self.holders += 1
        try:
            yield
        finally:
            with self.changed:
                self.used -= amount
                self.holders -= 1
                self.changed.notify_all()


@dataclass
class Outcome:
    """What became of one item."""

    index: int
    """Position of the item in the input."""
    item: object
    value: object = None
    """The sink's return value (by default the finished result); the item itself for an item
    that ``prepare`` passed through (returned None for)."""
    error: BaseException | None = None
    stage: str = ""
    """Where ``error`` happened: "prepare", "model" or "finish"."""
    notes: list[str] = field(default_factory=list)
    """Out-of-memory retries and the like."""
    pixels: int = 0
    """Output pixels (sH·sW) of a finished image."""
    passed: bool = False
    """True for an item that ``prepare`` passed through without the model."""


@dataclass
class _Job:
    index: int
    item: object
    prepared: Prepared
    notes: list[str] = field(default_factory=list)


_DONE = object()


class Pipeline:
    """Runs items through prepare -> model -> finish on threads; iterate it for the
    :class:`Outcome` of each item (in input order when ``ordered``, else as they finish).

    prepare(item) -> Prepared, or None to pass the item through untouched (e.g. an audio
    packet among video frames); an exception fails that item only.
    sink(item, result) -> value, run after finishing (e.g. write the file); default: the result.
    in_flight: most items between prepare and the consumer at once (bounds memory).
    progress(done, total): tile progress of the image being computed.

    Closing the iterator early (break, an exception, KeyboardInterrupt in the consumer) stops
    the threads and returns once they have: the images being computed are finished and
    dropped, sinks already running complete (so a sink that writes atomically leaves whole
    files only), nothing else is started.
    """

    def __init__(self, items: Iterable, prepare: Callable[[object], Prepared | None],
                 engine: Engine, *, sink: Callable[[object, object], object] | None = None,
                 ordered: bool = True, in_flight: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.items = items
        self.prepare = prepare
        self.engine = engine
        self.sink = sink
        self.ordered = ordered
        self.progress = progress
        self.in_flight = in_flight or max(4 * engine.workers + DECODE_THREADS + FINISH_THREADS,
                                          2 * (engine.batch_size or 1) * engine.workers)
        self._slots = threading.Semaphore(self.in_flight)
        self._stop = threading.Event()
        self._out: queue.Queue = queue.Queue()
        self._batches: queue.Queue = queue.Queue(maxsize=2 * engine.workers)
        self._fed: int | None = None

    def _deliver(self, outcome: Outcome) -> None:
        self._out.put(outcome)

    def _finish(self, job: _Job, sr: Tensor) -> None:
        try:
            result = job.prepared.finish(sr)
            value = result if self.sink is None else self.sink(job.item, result)
        except BaseException as err:  # noqa: BLE001 - KeyboardInterrupt included: reported
            self._deliver(Outcome(job.index, job.item, error=err, stage="finish",
                                  notes=job.notes))
            return
        self._deliver(Outcome(job.index, job.item, value, notes=job.notes,
                              pixels=sr.shape[0] * sr.shape[-2] * sr.shape[-1]))

    def _worker(self, worker: int, finisher: ThreadPoolExecutor) -> None:
        set_thread_count(self.engine.threads)
        while True:
            batch = self._batches.get()
            if batch is _DONE:
                return
            if self._stop.is_set():
                continue
            sizes = [job.prepared.colour.shape[0] for job in batch]
            starts = [sum(sizes[:k]) for k in range(len(batch))]
            owner = [k for k, size in enumerate(sizes) for _ in range(size)]

            def on_retry(i: int, text: str, batch: list[_Job] = batch) -> None:
                batch[owner[i]].notes.append(text)

            def progress(done: int, total: int) -> None:
                if self._stop.is_set():
                    raise Cancelled("the run was stopped")
                if self.progress is not None:
                    self.progress(done, total)

            try:
                colour = torch.cat([job.prepared.colour.to(self.engine.device)
                                    for job in batch]) if len(batch) > 1 \
                    else batch[0].prepared.colour
                results = self.engine.run(worker, colour, progress=progress,
                                          on_retry=on_retry)
            except BaseException as err:  # noqa: BLE001 - delivered to every image
                results = [err] * sum(sizes)
            if self._stop.is_set():
                continue
            for k, job in enumerate(batch):
                mine = results[starts[k]:starts[k] + sizes[k]]
                failed = next((r for r in mine if isinstance(r, BaseException)), None)
                if failed is not None:
                    self._deliver(Outcome(job.index, job.item, error=failed, stage="model",
                                          notes=job.notes))
                    continue
                sr = mine[0] if len(mine) == 1 else torch.cat(mine)
                try:
                    finisher.submit(self._finish, job, sr)
                except RuntimeError as err:  # the pool is shut down: the run is stopping
                    self._deliver(Outcome(job.index, job.item, error=err, stage="finish",
                                          notes=job.notes))

    def _feed(self, decoder: ThreadPoolExecutor) -> None:
        pending: deque[tuple[int, object, Future]] = deque()
        buckets: dict[tuple, list[_Job]] = {}
        index = 0

        def dispatch(key: tuple) -> None:
            self._batches.put(buckets.pop(key))

        def flush() -> None:
            for key in list(buckets):
                dispatch(key)

        def route(i: int, item: object, future: Future) -> None:
            try:
                prepared = future.result()
            except BaseException as err:  # noqa: BLE001 - reported per item
                self._deliver(Outcome(i, item, error=err, stage="prepare"))
                return
            if prepared is None:
                self._deliver(Outcome(i, item, item, passed=True))
                return
            height, width = prepared.colour.shape[-2:]
            tiled = self.engine.tile_for(height, width) is not None
            key = (height, width, i if tiled else -1)
            bucket = buckets.setdefault(key, [])
            bucket.append(_Job(i, item, prepared))
            limit = 1 if tiled else self.engine.batch_for(height, width)
            if sum(job.prepared.colour.shape[0] for job in bucket) >= limit:
                dispatch(key)

        try:
            for item in self.items:
                while not self._slots.acquire(timeout=0.05):
                    if self._stop.is_set():
                        return
                    while pending and pending[0][2].done():
                        route(*pending.popleft())
                    flush()
                if self._stop.is_set():
                    return
                pending.append((index, item, decoder.submit(self.prepare, item)))
                index += 1
                while pending and (pending[0][2].done() or len(pending) > DECODE_THREADS * 2):
                    route(*pending.popleft())
            while pending:
                route(*pending.popleft())
            flush()
        except BaseException as err:  # noqa: BLE001 - the items iterator failed: fatal
            self._out.put(("fatal", err))
        finally:
            self._fed = index
            for _ in range(self.engine.workers):
                self._batches.put(_DONE)
            self._out.put(("fed", index))

    def __iter__(self) -> Iterator[Outcome]:
        threads = torch.get_num_threads()
        # decoding and encoding at one torch thread each: beside the model workers, their own
        # OpenMP teams would oversubscribe the cores (their operations are exact either way)
        decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="camixer-prepare",
                                     initializer=set_thread_count, initargs=(1,))
        finisher = ThreadPoolExecutor(FINISH_THREADS, thread_name_prefix="camixer-finish",
                                      initializer=set_thread_count, initargs=(1,))
        workers = [threading.Thread(target=self._worker, args=(w, finisher), daemon=True,
                                    name=f"camixer-model-{w}")
                   for w in range(self.engine.workers)]
        feeder = threading.Thread(target=self._feed, args=(decoder,), daemon=True,
                                  name="camixer-feed")
        try:
            for thread in (*workers, feeder):
                thread.start()
            waiting: dict[int, Outcome] = {}
            next_index, total = 0, None
            while total is None or next_index < total:
                try:
                    record = self._out.get(timeout=0.1)
                except queue.Empty:
                    continue
                if isinstance(record, tuple):
                    if record[0] == "fatal":
                        raise record[1]
                    total = record[1]
                    continue
                if not self.ordered:
                    next_index += 1
                    yield record
                    self._slots.release()
                    continue
                waiting[record.index] = record
                while next_index in waiting:
                    outcome = waiting.pop(next_index)
                    next_index += 1
                    yield outcome
                    self._slots.release()
        finally:
            self._stop.set()
            for _ in range(self.in_flight):
                self._slots.release()
            feeder.join()
            for thread in workers:
                thread.join()
            decoder.shutdown(wait=True, cancel_futures=True)
            finisher.shutdown(wait=True, cancel_futures=True)
            set_thread_count(threads)


def upscale_iter(images: Iterable[ImageLike], gamma: float = 0.5, *,
                 weights: str | os.PathLike | Mapping = "CAMixerSR-S",
                 tile: int | str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None, backend: str = "auto",
                 batch_size: int | None = None, workers: int | None = None,
                 threads: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Iterator[ImageLike]:
    """Super-resolve every image of ``images`` (PIL images, numpy arrays, tensors, mixed as
    :func:`camixer_fast.upscale` takes them), yielding results lazily, in input order.

    ``images`` is consumed ahead of the model (a few at a time, on threads); images of the
    same size are batched and several are computed at once (see :class:`Engine` for
    ``batch_size``, ``workers`` and ``threads``). A result equals ``upscale(image)`` run with
    the same number of intra-op threads, whatever the batching. A bad image raises its error
    when its turn comes (the images before it have been yielded); an out-of-memory failure
    retries the image in smaller tiles with a RuntimeWarning. ``progress(done, total)`` is
    called after each tile of a tiled image.
    """
    import warnings

    engine = Engine(gamma, weights=weights, tile=tile, device=device, dtype=dtype,
                    backend=backend, batch_size=batch_size, workers=workers, threads=threads)
    for outcome in Pipeline(images, prepare, engine, progress=progress):
        for note in outcome.notes:
            warnings.warn(f"image {outcome.index}: {note}", RuntimeWarning, stacklevel=2)
        if outcome.error is not None:
            raise outcome.error
        yield outcome.value


def upscale_batch(images: Iterable[ImageLike], gamma: float = 0.5, **options) -> list[ImageLike]:
    """``list(upscale_iter(images, gamma, **options))``: every result, in input order."""
    return list(upscale_iter(images, gamma, **options))

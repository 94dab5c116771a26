"""The pipelined runner behind ``camixer-fast upscale`` and :func:`upscale_batch`:
items -> prepare (thread pool: read, decode) -> same-size batches -> model workers (each with
its own network copy) -> finish (thread pool: rebuild, write) -> outcomes, so the model never
waits on I/O. Routing is per image and the CPU network runs a batch image by image, so an
output depends only on ``threads`` (the CPU kernels round with the thread count), not on the
batching, the workers or the order. Allocation failures rerun a batch image by image, then in
halved tiles (:func:`camixer_fast.inference.tiling.run_network`), noted on the outcome.
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
from camixer_fast.inference.tiling import (MemoryUse, auto_tile, available_memory, forward_bytes,
                                           is_allocation_failure, is_panoramic, memory_use,
                                           run_network, wrap_margin)
from camixer_fast.reference.routing import check_gamma

MAX_AUTO_BATCH = 8
DECODE_THREADS = 2
FINISH_THREADS = 2


def default_workers(device: torch.device) -> int:
    """1 worker with all of torch's threads: results equal :func:`camixer_fast.upscale`'s."""
    return 1


class Engine:
    """The network, ready to run batches on one device from several worker threads.

    Arguments as :func:`camixer_fast.upscale` takes them, plus batch_size (images or tiles per
    model call; None: what fits in memory, at most :data:`MAX_AUTO_BATCH`), workers (network
    copies; None: :func:`default_workers`) and threads (CPU threads per image; None: torch's
    threads // workers); wrap as :func:`camixer_fast.upscale` takes it (images are whole
    panoramas). Raises what :func:`camixer_fast.load_model` raises, ValueError for bad settings.
    """

    def __init__(self, gamma: float = 0.5, *, weights: str | os.PathLike | Mapping = "CAMixerSR-S",
                 tile: int | str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None, backend: str = "auto",
                 batch_size: int | None = None, workers: int | None = None,
                 threads: int | None = None, wrap: bool | int | None = None) -> None:
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
        with _one_thread():
            base = cached_model(weights, self.device, self.dtype, backend).model
            self.scale = base.scale
            self.panoramic = is_panoramic(base)
            self.margin = wrap_margin(base, wrap, None)
            self.models = []
            for _ in range(self.workers):
                model = copy.deepcopy(base)
                model.gamma = self.gamma
                self.models.append(model)
        self._room = Room(int(self._use().fraction * available_memory(self.device)))

    def _use(self) -> MemoryUse:
        return memory_use(self.device, panoramic=self.panoramic)

    def _budget(self) -> int:
        return int(self._use().fraction * available_memory(self.device) / self.workers)

    def tile_for(self, height: int, width: int) -> int | None:
        """``tile``, or for "auto" what fits in this worker's share of the memory (of the
        image wrapped by :attr:`margin` columns on each side)."""
        if self.tile == "auto":
            return auto_tile(height, width + 2 * self.margin, scale=self.scale,
                             device=self.device, dtype=self.dtype, budget=self._budget(),
                             panoramic=self.panoramic)
        return self.tile

    def batch_for(self, height: int, width: int) -> int:
        if self.batch_size is not None:
            return self.batch_size
        per_image = forward_bytes(height * width, device=self.device, dtype=self.dtype,
                                  outputs=height * width, scale=self.scale,
                                  panoramic=self.panoramic)
        return int(max(1, min(MAX_AUTO_BATCH, self._budget() // per_image)))

    def working_set(self, count: int, height: int, width: int, tile: int | None) -> int:
        """Expected bytes of a batch: one image's (or tile's) forward plus all inputs/outputs."""
        width += 2 * self.margin
        pixels = min(tile, height) * min(tile, width) if tile else height * width
        return forward_bytes(pixels, device=self.device, dtype=self.dtype,
                             outputs=count * height * width, scale=self.scale,
                             panoramic=self.panoramic) \
            + count * height * width * 3 * 4

    def run(self, worker: int, colour: Tensor, *,
            progress: Callable[[int, int], None] | None = None,
            on_retry: Callable[[int, str], None] | None = None) -> list[Tensor | BaseException]:
        """(B, 3, H, W) ``colour`` on worker ``worker``'s network -> per image its (1, 3, sH, sW)
        float32 CPU result in [0, 1], or its exception; ``on_retry(i, text)`` hears of retries.
        A batch waits until its :meth:`working_set` fits beside the other workers'."""
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
            if count > 1 and tile is None and not self.margin:
                try:
                    out = model(x)
                    return [o[None].float().cpu().clamp(0, 1) for o in out]
                except Exception:  # noqa: BLE001 - rerun one by one, errors go to their image
                    pass
            tiles_per_call = 1
            if tile and (self.batch_size or self.device.type != "cpu"):
                # the CPU network runs tiles one by one anyway; one per call stops sooner
                tiles_per_call = self.batch_for(min(tile, height), min(tile, width))
            results: list[Tensor | BaseException] = []
            for i in range(count):
                retry = None if on_retry is None else (lambda text, i=i: on_retry(i, text))
                try:
                    out = run_network(model, x[i:i + 1], tile, batch=tiles_per_call,
                                      progress=progress, on_retry=retry, wrap=self.margin)
                    results.append(out.float().cpu().clamp_(0, 1))
                except Exception as err:  # noqa: BLE001 - reported per image
                    if is_allocation_failure(err) and not isinstance(err, MemoryError):
                        if self.device.type == "cuda":
                            torch.cuda.empty_cache()
                        need = self.working_set(1, height, width, tile)
                        err = MemoryError(f"out of memory on a {height}x{width} input: needs "
                                          f"about {need >> 20} MiB, "
                                          f"{available_memory(self.device) >> 20} MiB available")
                    results.append(err)
            return results


class Cancelled(Exception):
    """Raised between tiles in a model worker when the run is stopping."""


def set_thread_count(threads: int) -> None:
    """This thread's torch intra-op threads, for good: asking first runs PyTorch's lazy
    per-thread initialisation, which would otherwise reset the count to the last one set."""
    torch.get_num_threads()
    torch.set_num_threads(threads)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The caller's torch work at one thread, restored after: an OpenMP team of the caller's
    own slows the model workers' forwards."""
    threads = torch.get_num_threads()
    set_thread_count(1)
    try:
        yield
    finally:
        set_thread_count(threads)


class Room:
    """Bytes shared by the workers: :meth:`taking` waits until the amount fits or none is held."""

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
    """What became of item ``index``: the sink's ``value`` (the item itself when ``passed``
    through prepare), or ``error`` at ``stage`` ("prepare", "model", "finish"); ``notes`` (e.g.
    retries); output ``pixels`` (sH·sW)."""

    index: int
    item: object
    value: object = None
    error: BaseException | None = None
    stage: str = ""
    notes: list[str] = field(default_factory=list)
    pixels: int = 0
    passed: bool = False


@dataclass
class _Job:
    index: int
    item: object
    prepared: Prepared
    notes: list[str] = field(default_factory=list)


_DONE = object()


class Pipeline:
    """Iterate for each item's :class:`Outcome` (in input order when ``ordered``).

    prepare(item) -> Prepared, or None to pass the item through (e.g. an audio packet);
    sink(item, result) -> value runs after finishing (e.g. writes the file); in_flight bounds
    the items held; progress(done, total) hears of tiles. Closing the iterator early (break,
    KeyboardInterrupt) stops the threads: the image in the model stops after its current tile,
    running sinks complete, nothing else starts.
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
        # prepare and finish at one torch thread: their own OpenMP teams would oversubscribe
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
                 threads: int | None = None, wrap: bool | int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Iterator[ImageLike]:
    """Super-resolve ``images`` (as :func:`camixer_fast.upscale` takes them), yielding results
    in input order; each equals ``upscale(image)`` at the same thread count. Options: see
    :class:`Engine`. A bad image raises when its turn comes; out-of-memory retries warn
    (RuntimeWarning); ``progress(done, total)`` hears of tiles.
    """
    import warnings

    engine = Engine(gamma, weights=weights, tile=tile, device=device, dtype=dtype,
                    backend=backend, batch_size=batch_size, workers=workers, threads=threads,
                    wrap=wrap)
    for outcome in Pipeline(images, prepare, engine, progress=progress):
        for note in outcome.notes:
            warnings.warn(f"image {outcome.index}: {note}", RuntimeWarning, stacklevel=2)
        if outcome.error is not None:
            raise outcome.error
        yield outcome.value


def upscale_batch(images: Iterable[ImageLike], gamma: float = 0.5, **options) -> list[ImageLike]:
    """``list(upscale_iter(images, gamma, **options))``: every result, in input order."""
    return list(upscale_iter(images, gamma, **options))

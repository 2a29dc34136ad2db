"""The synchronous client: batches, requests in flight on a thread pool, bad uploads re-sent alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from builder.core import contract as C
from clients.errors import ClientError, InvalidImage, Overloaded, RequestTimeout, SettingsError
from clients.settings import Classification, ClientSettings, ImageLike
from clients.transport import (_class_outputs, _Engine, _infer_kwargs, _load_all, _make_client, _params_from_config,
                               _SharedMemory, _source_name, _with_retries, checked_request, parse_classifications,
                               rejected, to_client_error)

class Classifier:
    """Synchronous client (thread pool for requests in flight).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, settings: ClientSettings):
        self.settings = settings
        self._engine = _Engine(settings)
        self._local = threading.local()
        self._all: List[Tuple[Any, Optional[_SharedMemory]]] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="classify")
        self._params = None  # preprocess parameters, read from the server once (classifier mode)

    # one tritonclient client per thread: the HTTP client is not thread-safe
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = _make_client(self.settings)
            shm = _SharedMemory(self.settings.shared_memory) if self.settings.shared_memory != "none" else None
            self._local.client, self._local.shm = client, shm
            with self._lock:
                self._all.append((client, shm))
        return client

    def wait_until_ready(self, timeout_s: float = 60.0) -> None:
        """Blocks until the server and the model are ready.

        Raises:
            RequestTimeout: Not ready within `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                client = self._client()
                if client.is_server_ready() and client.is_model_ready(self.settings.model, self.settings.model_version):
                    return
                last = "server up, model not ready"
            except Exception as exc:
                last = str(to_client_error(exc))
            time.sleep(0.25)
        raise RequestTimeout(f"{self.settings.url}: {self.settings.model} not ready after {timeout_s:.0f} s ({last})")

    def check_model(self) -> int:
        """Reads the served model's max_batch_size and refuses a `max_batch` above it.

        Returns:
            The model's max_batch_size.

        Raises:
            SettingsError: `max_batch` is above what the model takes.
            ServerUnavailable, ModelNotFound: The server or the model cannot be reached.
        """
        model = self.settings.model if self.settings.mode == "ensemble" else self._engine.names.classifier
        kwargs = {"as_json": True} if self.settings.protocol == "grpc" else {}
        config = _with_retries(self.settings, lambda: self._client().get_model_config(
            model, self.settings.model_version, **kwargs))
        config = config.get("config", config)  # gRPC's JSON wraps the config
        largest = int(config.get("max_batch_size", 0))
        if 0 < largest < self.settings.max_batch:
            raise SettingsError(f"max_batch: {self.settings.max_batch} is above {model}'s max_batch_size "
                                f"{largest}; pass --max-batch {largest} or less")
        return largest

    def _infer(self, model: str, inputs: list, outputs: list, arrays: list):
        client = self._client()
        shm = self._local.shm
        for tensor, array in zip(inputs, arrays):
            if shm is not None:
                shm.place(client, array, tensor)
            else:
                tensor.set_data_from_numpy(array)
        return client.infer(model, inputs, outputs=outputs, **_infer_kwargs(self.settings))

    def _classify_chunk(self, items, top_k: int, want_logits: bool) -> List[Classification]:
        sources = [s for s, _ in items]
        if self.settings.mode == "classifier":
            return self._classify_chunk_bare(items, top_k, want_logits)
        tensor, array, outputs = self._engine.ensemble_request([b for _, b in items], top_k, want_logits)
        try:
            response = _with_retries(self.settings, lambda: self._infer(
                self.settings.model, [tensor], outputs, [array]))
        except Overloaded as exc:  # still rejected after the backoffs: these images alone fail
            return rejected(sources, exc)
        except InvalidImage as exc:
            if len(items) == 1:
                return [Classification(sources[0], error=str(exc))]
            # One bad image fails its whole request: resend one by one so the
            # others are served and the bad one names itself.
            return [r for item in items for r in self._classify_chunk([item], top_k, want_logits)]
        return self._engine.results(sources, response, want_logits)

    def _preprocess_params(self):
        if self._params is None:
            config = _with_retries(self.settings, lambda: self._client().get_model_config(
                self._engine.names.preprocess, **({"as_json": True} if self.settings.protocol == "grpc" else {})))
            self._params = _params_from_config(config)
        return self._params

    def _classify_chunk_bare(self, items, top_k: int, want_logits: bool) -> List[Classification]:
        from builder.core import imaging

        batch, errors = imaging.preprocess_many([b for _, b in items], self._preprocess_params())
        good = [i for i, e in enumerate(errors) if e is None]
        results: Dict[int, Classification] = {
            i: Classification(items[i][0], error=e) for i, e in enumerate(errors) if e}
        if good:
            try:
                self._classify_pixels(items, batch, good, top_k, want_logits, results)
            except Overloaded as exc:
                results.update(zip(good, rejected([items[i][0] for i in good], exc)))
        return [results[i] for i in range(len(items))]

    def _classify_pixels(self, items, batch, good, top_k: int, want_logits: bool, results) -> None:
        """The classifier and postprocess models on the preprocessed rows `good`; fills `results`."""
        module, names = self._engine.module, self._engine.names
        pixels = module.InferInput(C.PIXELS, [len(good), *batch.shape[1:]], "FP32")
        response = _with_retries(self.settings, lambda: self._infer(
            names.classifier, [pixels], [module.InferRequestedOutput(C.LOGITS)], [batch[good]]))
        logits = response.as_numpy(C.LOGITS)
        # Probabilities from the postprocess model, ranked and labelled by the server (one source of truth).
        tensor = module.InferInput(C.LOGITS, list(logits.shape), "FP32")
        ranked = _with_retries(self.settings, lambda: self._infer(
            names.postprocess, [tensor], _class_outputs(module, top_k, False), [logits]))
        rows = parse_classifications(ranked.as_numpy(C.PROBABILITIES))
        for row, i in enumerate(good):
            results[i] = Classification(items[i][0], rows[row], logits[row] if want_logits else None)

    def classify(self, images: Sequence[ImageLike], top_k: int = 5, return_logits: bool = False,
                 progress: Optional[Callable[[int], None]] = None) -> List[Classification]:
        """Classifies images; failures are per image, never lost.

        Args:
            images: Encoded bytes, paths, HWC uint8 arrays or PIL images.
            top_k: Classes per image (Triton's classification extension ranks them; at most the model's classes).
            return_logits: Also return the raw logits.
            progress: Called with the number of images finished per request.

        Returns:
            One :class:`Classification` per image, in input order.

        Raises:
            ServerUnavailable, RequestTimeout, ModelNotFound, InferenceFailed:
                Request-level failures (not a bad image, nor a request still
                rejected as overloaded after `overload_retries` backoffs: those
                are reported in their Classifications). The error's `results`
                holds every image's result, the answered ones included.
        """
        images = checked_request(images, top_k)
        results: Dict[int, Classification] = {}
        try:
            for position, result in self.iter_classify(images, top_k, return_logits, raise_errors=True):
                results[position] = result
                if progress:
                    progress(1)
        except ClientError as exc:
            # The run stops, but what was answered is not lost: it travels with the error.
            exc.results = [results.get(i) or Classification(_source_name(images[i], i), error=f"not classified: {exc}")
                           for i in range(len(images))]
            raise
        return [results[i] for i in range(len(images))]

    def iter_classify(self, images: Sequence[ImageLike], top_k: int = 5, return_logits: bool = False,
                      raise_errors: bool = False) -> Iterator[Tuple[int, Classification]]:
        """Yields (position, result) for each image as its request finishes.

        Files are read when their request is built, not all up front, and at
        most `2 * concurrency` requests are queued. A request-level failure
        (server gone after the retries, timeout, unknown model) stops the run:
        with `raise_errors` it is raised; otherwise every image not answered
        yet is yielded as failed with that error, and the answers already
        yielded stand.

        Args:
            images: As for :meth:`classify`.
            top_k: Classes per image.
            return_logits: Also return the raw logits.
            raise_errors: Raise request-level failures instead of reporting them per image.
        """
        images = checked_request(images, top_k)
        chunks = self._engine.chunks(list(range(len(images))))
        pending: Dict[Future, List[int]] = {}
        done_positions: set = set()
        next_chunk, fatal = 0, None
        try:
            while pending or (next_chunk < len(chunks) and fatal is None):
                while fatal is None and next_chunk < len(chunks) and len(pending) < 2 * self.settings.concurrency:
                    chunk = chunks[next_chunk]
                    pending[self._pool.submit(self._run_positions, images, chunk, top_k, return_logits)] = chunk
                    next_chunk += 1
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in finished:
                    chunk = pending.pop(future)
                    try:
                        answers = future.result()
                    except ClientError as exc:
                        fatal = fatal or exc
                        continue
                    for position, result in answers:
                        done_positions.add(position)
                        yield position, result
        finally:
            for future in pending:
                future.cancel()
        if fatal is not None:
            if raise_errors:
                raise fatal
            for position in range(len(images)):
                if position not in done_positions:
                    yield position, Classification(_source_name(images[position], position),
                                                   error=f"not classified: {fatal}")

    def _run_positions(self, images, positions, top_k: int, want_logits: bool) -> List[Tuple[int, Classification]]:
        loaded, failed = _load_all([images[i] for i in positions], positions)
        answers = list(failed.items())
        if loaded:
            out = self._classify_chunk([item for _, item in loaded], top_k, want_logits)
            answers += [(position, result) for (position, _), result in zip(loaded, out)]
        return answers

    def close(self) -> None:
        """Releases shared memory regions and connections."""
        self._pool.shutdown(wait=True)
        for client, shm in self._all:
            if shm is not None:
                shm.release(client)
            try:
                client.close()
            except Exception:
                pass
        self._all.clear()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

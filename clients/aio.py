"""The asyncio client (tritonclient's grpc.aio / http.aio), ensemble mode."""

from __future__ import annotations

import asyncio
import time
from typing import List, Sequence

from clients.errors import InvalidImage, Overloaded, RequestTimeout, SettingsError
from clients.settings import Classification, ClientSettings, ImageLike
from clients.transport import (_Engine, _infer_kwargs, _load_all, _make_client, _module, _with_retries_async,
                               checked_request, rejected, to_client_error)


class AsyncClassifier:
    """asyncio client (tritonclient's grpc.aio / http.aio), ensemble mode.

    Use with `async with`, or await :meth:`close`.
    """

    def __init__(self, settings: ClientSettings):
        if settings.shared_memory != "none":
            raise SettingsError("shared_memory: the asyncio client sends tensors over the wire; "
                                "use Classifier for shared memory")
        if settings.mode != "ensemble":
            raise SettingsError("mode: the asyncio client calls the ensemble; use Classifier for mode='classifier'")
        self.settings = settings
        self._engine = _Engine(settings)
        self._engine.module = _module(settings.protocol, aio=True)
        self._client = _make_client(settings, aio=True)
        self._semaphore = asyncio.Semaphore(settings.concurrency)

    async def wait_until_ready(self, timeout_s: float = 60.0) -> None:
        """Waits until the server and model are ready (raises RequestTimeout)."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                if await self._client.is_server_ready() and await self._client.is_model_ready(
                        self.settings.model, self.settings.model_version):
                    return
                last = "server up, model not ready"
            except Exception as exc:
                last = str(to_client_error(exc))
            await asyncio.sleep(0.25)
        raise RequestTimeout(f"{self.settings.url}: {self.settings.model} not ready after {timeout_s:.0f} s ({last})")

    async def _classify_chunk(self, items, top_k: int, want_logits: bool) -> List[Classification]:
        sources = [s for s, _ in items]
        tensor, array, outputs = self._engine.ensemble_request([b for _, b in items], top_k, want_logits)
        tensor.set_data_from_numpy(array)
        kwargs = _infer_kwargs(self.settings)

        async def call():
            async with self._semaphore:
                if self.settings.protocol == "http":
                    return await asyncio.wait_for(self._client.infer(self.settings.model, [tensor], outputs=outputs,
                                                                     **kwargs), self.settings.timeout_s)
                return await self._client.infer(self.settings.model, [tensor], outputs=outputs, **kwargs)

        try:
            response = await _with_retries_async(self.settings, call)
        except Overloaded as exc:  # still rejected after the backoffs: these images alone fail
            return rejected(sources, exc)
        except InvalidImage as exc:
            if len(items) == 1:
                return [Classification(sources[0], error=str(exc))]
            parts = await asyncio.gather(*(self._classify_chunk([item], top_k, want_logits) for item in items))
            return [r for part in parts for r in part]
        return self._engine.results(sources, response, want_logits)

    async def classify(self, images: Sequence[ImageLike], top_k: int = 5,
                       return_logits: bool = False) -> List[Classification]:
        """Async twin of :meth:`Classifier.classify` (same results, same errors)."""
        images = checked_request(images, top_k)
        loaded, results = _load_all(images)
        chunks = self._engine.chunks([x for _, x in loaded])
        parts = await asyncio.gather(*(self._classify_chunk([loaded[i][1] for i in c], top_k, return_logits)
                                       for c in chunks))
        for chunk, part in zip(chunks, parts):
            results.update((loaded[i][0], r) for i, r in zip(chunk, part))
        return [results[i] for i in range(len(images))]

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncClassifier":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

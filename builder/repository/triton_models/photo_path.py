"""Triton Python-backend model: image bytes -> class probabilities, the photo path in one model (`--preprocess gpu`).

Copied into the repository as `<name>/<version>/model.py` (the name clients call, where the other
preprocessings put the ensemble), with the modules of `triton_models.SERVED_MODULES["photo_path"]` and the
load-time gate's photos beside it (`labels.txt`, which its outputs carry, in the model folder). Per dynamic batch of
requests:

1. every request's images are decoded and transformed together on the GPU (`gpu_imaging.GpuPreprocessor`;
   the exact CPU path for what the GPU decoder cannot take, with its error messages);
2. the rows of the requests without a failed image are classified in chunks of `classifier_max_batch`
   rows: by the classifier's inductor engine in this process (`fused`: its files in `engine/`), or by one
   BLS request to the classifier model per chunk, one GPU tensor handed over by DLPack (`bls`), or the
   first for chunks of up to `local_max_batch` rows and the second above (`hybrid`);
3. softmax on the GPU (`torch_runner.class_outputs_packed`), then one copy of probabilities and logits to the
   host; top-k with class names is Triton's classification extension on them (a request's `class_count`).

Why one model: in the ensemble every request's tensor crossed three Python models one by one (on an H200,
9.9 ms of output hand-off and 5.4 ms of input gathering per batch of ~21 requests). Here a batch crosses
once (fused: not at all). The classifier stays its own model, so direct clients and the native backends
still reach it.
Requests with a failed image get an error naming the item, as from the ensemble; the others are served.
"""

import json
import os
import sys
import time

import numpy as np
import triton_python_backend_utils as pb_utils

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.isfile(os.path.join(_HERE, "imaging.py")):  # served: the modules were copied beside model.py
    sys.path.insert(0, _HERE)
    import gpu_imaging
    import imaging
    import served
    import torch_runner
else:  # imported as part of the project
    from builder.core import imaging
    from builder.engines import torch_runner
    from builder.repository.triton_models import gpu_imaging, served


class TritonPythonModel:
    """Decode, classify (in this process, or one BLS request per chunk) and softmax, batched across requests."""

    def initialize(self, args):
        import torch

        self.torch = torch
        config, params, device = served.model_setup(args)
        self.params = imaging.PreprocessParams.from_parameters(params)
        self.input_name = config["input"][0]["name"]
        self.outputs = [o["name"] for o in config["output"]]  # probabilities, logits
        self.classifier = params["classifier"]
        self.classifier_input, self.classifier_output = params["classifier_input"], params["classifier_output"]
        self.chunk = int(params["classifier_max_batch"])
        self.pool = served.exact_pool(params, "photo-path")
        self.gpu = gpu_imaging.GpuPreprocessor.from_config(self.params, params, device, self.pool.map, served.log_warn)
        try:
            figures, photos = gpu_imaging.gate_model(self.gpu, _HERE, params)
        except ValueError as exc:  # the model does not load: nothing is served off the exact path
            raise pb_utils.TritonModelException(f"{args.get('model_name')}: {exc}") from None
        warmed = self._warm_decoder(photos)
        # `fused`: the classifier's engine runs here, in this process, instead of one BLS request per batch.
        # `hybrid`: here for batches of up to `local_max_batch` images (a lone photo skips the hop), by BLS
        # above (a full batch joins other instances' batches in the classifier model). "0": BLS only.
        self.engine, self.local_max = None, 0
        if params.get("engine_dir"):
            self.local_max = min(int(params.get("local_max_batch", self.chunk)), self.chunk)
        if self.local_max > 0:
            self.engine = torch_runner.TorchEngine(os.path.join(_HERE, params["engine_dir"]), device, params,
                                                   self.local_max, log=served.log_info)
        # profile_every N > 0: every N batches, log where the time of those batches went (phases synchronized
        # with the device, so it slows serving a little: a diagnostic, off by default). trace_dir + trace_batches
        # "first,count": a torch profiler trace of those batches, one Chrome trace file per instance.
        self.profile_every = int(params.get("profile_every", "0"))
        self.trace_dir = params.get("trace_dir", "")
        self.trace_batches = [int(v) for v in params.get("trace_batches", "20,3").split(",")]
        self.tracer = None
        self.phases, self.batches, self.clock = {}, 0, 0.0
        served.log_info(f"photo path ({self._design()}): GPU decode on {device}, decoder {self.gpu.decoder.backend} "
                        f"(warmed on batches of {warmed}), classifier {self.classifier} "
                        f"{self._where()} in batches of up to {self.chunk}; "
                        f"load-time parity gate passed: {json.dumps(figures)}")

    def _design(self):
        """The design this configuration is (`--gpu-photo-path`): one class, told apart by the local batch."""
        if self.engine is None:
            return "bls"
        return "hybrid" if self.local_max < self.chunk else "fused"

    def _where(self):
        """Where the classifier runs, for the load log."""
        if self.engine is None:
            return "by BLS"
        if self.local_max < self.chunk:
            return f"in this process up to {self.local_max} images, by BLS above"
        return "in this process"

    def _warm_decoder(self, photos):
        """Runs the decoder and transform on the gate's photos at every power-of-two batch up to the chunk.

        The first batches after load were the slowest of a run (the decoder's buffers grow with the batch):
        warmed here, they are not a user's. No classifier call (a BLS call at load hung an H200's load).
        """
        sizes = [1 << i for i in range(self.chunk.bit_length()) if 1 << i <= self.chunk]
        for size in sizes:
            self.gpu([photos[i % len(photos)] for i in range(size)])
        self.gpu.counts.update(gpu=0, exact=0)  # warm-up is not traffic
        return sizes

    def _phase(self, name):
        """Adds the time since the last mark to phase `name` when profiling (device synchronized)."""
        if not self.profile_every:
            return
        if self.gpu.device.type == "cuda":
            self.torch.cuda.synchronize(self.gpu.device)
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.clock
        self.clock = now

    def _trace(self):
        """Starts or stops the torch profiler around the batches `trace_batches` names."""
        first, count = self.trace_batches
        if self.batches == first:
            from torch.profiler import ProfilerActivity, profile

            self.tracer = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.tracer.__enter__()
        elif self.batches == first + count and self.tracer is not None:
            self.tracer.__exit__(None, None, None)
            path = os.path.join(self.trace_dir, f"photo-path-trace-{os.getpid()}.json")
            self.tracer.export_chrome_trace(path)
            self.tracer = None
            served.log_info(f"photo path: trace of batches {first}..{first + count - 1} written to {path}")

    def execute(self, requests):
        if self.trace_dir:
            self._trace()
        self.clock = time.perf_counter()
        per_request = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy().reshape(-1)
                       for r in requests]
        flat = [imaging.as_bytes(item) for items in per_request for item in items]
        self._phase("inputs")
        batch, errors = self.gpu(flat, self._phase if self.profile_every else None)
        spans, start = [], 0
        for items in per_request:
            spans.append((start, start + len(items)))
            start += len(items)
        whole = [i for i, (a, b) in enumerate(spans) if not any(errors[a:b])]
        rows = [row for i in whole for row in range(*spans[i])]
        results = self._classify(batch[rows] if len(rows) < len(batch) else batch) if rows else None
        self._phase("classify+softmax")
        responses, at = [], 0
        for request, (a, b) in zip(requests, spans):
            failed = [f"{self.input_name}[{i}]: {err}" for i, err in enumerate(errors[a:b]) if err]
            if failed:
                responses.append(served.error_response("; ".join(failed)))
                continue
            n = b - a
            arrays = dict(zip(self.outputs, (r[at:at + n] for r in results)))
            at += n
            # Only the outputs the request asked for (Triton would drop the others after they were built).
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, np.ascontiguousarray(arrays[name])) for name in self._requested(request)]))
        self._phase("responses")
        self.batches += 1
        if self.profile_every:
            self.phases["images"] = self.phases.get("images", 0) + len(flat)
            if self.batches % self.profile_every == 0:
                images = self.phases.pop("images")
                graphs = self.gpu.graphs.captures if self.gpu.graphs is not None else "off"
                served.log_info(f"photo path profile over {self.profile_every} batches, {images} images: " + ", ".join(
                    f"{k} {v * 1e3 / images:.3f} ms/image" for k, v in self.phases.items())
                    + f" (transform graphs captured: {graphs})")
                self.phases = {}
        return responses

    def _requested(self, request):
        """The output names a request asked for, in the model's order (all of them when it named none)."""
        try:
            names = set(request.requested_output_names())
        except AttributeError:  # a Python backend without the call
            names = set()
        return [name for name in self.outputs if name in names] or self.outputs

    def _classify(self, pixels):
        """Probabilities and logits of `pixels` as host arrays: one device-to-host copy for both.

        Each `.cpu()` is a synchronizing copy of its own, so the two travel packed in one tensor (`_packed`).
        """
        torch = self.torch
        chunks = [self._packed(pixels[i:i + self.chunk]) for i in range(0, len(pixels), self.chunk)]
        packed = (torch.cat(chunks) if len(chunks) > 1 else chunks[0]).cpu().numpy()
        classes = packed.shape[1] // 2
        return packed[:, :classes], packed[:, classes:]

    def _packed(self, pixels):
        """One chunk's logits (from the engine here or by BLS), packed by `torch_runner.class_outputs_packed`."""
        logits = self.engine(pixels) if len(pixels) <= self.local_max else self._bls_logits(pixels).float()
        return torch_runner.class_outputs_packed(logits)

    def _bls_logits(self, pixels):
        """The classifier model's logits of `pixels`: one BLS request, one GPU tensor handed over by DLPack."""
        from torch.utils.dlpack import from_dlpack, to_dlpack

        request = pb_utils.InferenceRequest(
            model_name=self.classifier, requested_output_names=[self.classifier_output],
            inputs=[pb_utils.Tensor.from_dlpack(self.classifier_input, to_dlpack(pixels.contiguous()))])
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(f"{self.classifier}: {response.error().message()}")
        output = pb_utils.get_output_tensor_by_name(response, self.classifier_output)
        if output.is_cpu():
            return self.torch.from_numpy(output.as_numpy()).to(pixels.device)
        return from_dlpack(output.to_dlpack())

    def finalize(self):
        if getattr(self, "tracer", None) is not None:
            self.tracer.__exit__(None, None, None)
        self.pool.shutdown(wait=False)

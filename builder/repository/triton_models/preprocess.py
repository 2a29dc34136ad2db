"""Triton Python-backend model: encoded image bytes -> normalized pixels.

Copied into the repository as `<name>_preprocess/<version>/model.py`, with
`imaging.py` and `served.py` beside it (`triton_models.SERVED_MODULES`). It is
the first step of the ensemble, and with `--preprocess gpu` it stays for direct
clients on CPU instances. The transform's parameters come from the model's
config `parameters` (written from timm's data config by the builder) and are
read once in `initialize`. Requests that the dynamic batcher groups are decoded
together on a thread pool (Pillow releases the GIL while decoding and
resampling); an image that fails answers its own request with an error naming
the item, and the other requests of the batch are served.

With the config parameter `preprocess: gpu` the batch goes through
`gpu_imaging.GpuPreprocessor` instead (copied beside this file with
`gpu_transform.py` for the `gpu` variant): one batched decode and resize, the
exact path for what the GPU cannot take, and the output handed on by DLPack.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.isfile(os.path.join(_HERE, "imaging.py")):  # served: the modules were copied beside model.py
    sys.path.insert(0, _HERE)
    import imaging
    import served
else:  # imported as part of the project
    from builder.core import imaging
    from builder.repository.triton_models import served


class TritonPythonModel:
    """Decodes and transforms images, batched across requests."""

    def initialize(self, args):
        config, params, device = served.model_setup(args)
        self.params = imaging.PreprocessParams.from_parameters(params)
        self.input_name = config["input"][0]["name"]
        output = config["output"][0]
        self.output_name = output["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(output["data_type"])
        self.pool = served.exact_pool(params, "preprocess")
        self.gpu = None
        if params.get("preprocess") == "gpu":
            if os.path.isfile(os.path.join(_HERE, "imaging.py")):
                import gpu_imaging
            else:
                from builder.repository.triton_models import gpu_imaging
            self.gpu = gpu_imaging.GpuPreprocessor.from_config(self.params, params, device, self.pool.map,
                                                               served.log_warn)
            served.log_info(f"preprocess: GPU decode and transform on {device}, decoder {self.gpu.decoder.backend}")
            self._load_gate(gpu_imaging, args, params)

    def _load_gate(self, gpu_imaging, args, params):
        """The served decoder against the exact path on the photos beside this file; the load fails if off."""
        try:
            figures, _ = gpu_imaging.gate_model(self.gpu, _HERE, params)
        except ValueError as exc:  # the model does not load: nothing is served off the exact path
            raise pb_utils.TritonModelException(f"{args.get('model_name')}: {exc}") from None
        served.log_info(f"preprocess: load-time parity gate passed: {json.dumps(figures)}")

    def _one(self, data):
        return imaging.try_preprocess(imaging.as_bytes(data), self.params)

    def execute(self, requests):
        per_request = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy().reshape(-1)
                       for r in requests]
        flat = [item for items in per_request for item in items]
        if self.gpu is not None:
            return self._respond_gpu(per_request, flat)
        results = list(self.pool.map(self._one, flat))
        responses, start = [], 0
        for items in per_request:
            mine = results[start:start + len(items)]
            start += len(items)
            failed = [f"{self.input_name}[{i}]: {err}" for i, (_, err) in enumerate(mine) if err]
            if failed:
                responses.append(served.error_response("; ".join(failed)))
                continue
            batch = np.stack([pixels for pixels, _ in mine]).astype(self.output_dtype, copy=False)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, batch)]))
        return responses

    def _respond_gpu(self, per_request, flat):
        from torch.utils.dlpack import to_dlpack

        batch, errors = self.gpu([imaging.as_bytes(item) for item in flat])
        responses, start = [], 0
        for items in per_request:
            end = start + len(items)
            failed = [f"{self.input_name}[{i}]: {err}" for i, err in enumerate(errors[start:end]) if err]
            if failed:
                responses.append(served.error_response("; ".join(failed)))
            else:  # a contiguous slice of the batch: handed over on the device, no copy
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor.from_dlpack(self.output_name, to_dlpack(batch[start:end]))]))
            start = end
        return responses

    def finalize(self):
        self.pool.shutdown(wait=False)

"""Triton Python-backend model: the classifier, where no native backend runs it.

Used in the `local` flavor (the pip tritonserver has only the Python backend) and, in both flavors, for the
inductor engine. It runs what the version directory holds:

- `model.pt2`: the inductor engine (a torch.export program, FP16 on the GPU, compiled by TorchInductor with
  one CUDA graph per batch bucket, `torch_runner.py` beside this file); input by DLPack where it lies (the
  GPU preprocessing's output stays on the GPU), logits to the host in one copy per batch;
- `model.plan`: TensorRT, through `builder.engines.plan_runner.PlanRunner` on Polygraphy (copied beside this
  file with the numpy-only modules it needs); host arrays, or device memory by DLPack without a copy;
- else `model.onnx` on ONNX Runtime.

Its config has the same name, tensors, batching and instance groups as the native `onnxruntime_onnx` /
`tensorrt_plan` models of the `container` flavor, so clients cannot tell them apart. Requests of a dynamic
batch run as one call.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


def _onnxruntime(path, params):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(path, options, providers=providers)

    def run(name, tensors):
        arrays = [t.as_numpy() for t in tensors]
        return arrays, session.run(None, {name: np.concatenate(arrays) if len(arrays) > 1 else arrays[0]})[0]

    return run


def _tensorrt(path, device):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from builder.engines.plan_runner import PlanRunner, device_view_from_dlpack  # the copies beside this file

    runner = PlanRunner(path, device=device)

    def run(name, tensors):
        # Host tensors (clients) as numpy; device tensors (the GPU preprocessing) wrapped where they lie.
        parts = [t.as_numpy() if t.is_cpu() else device_view_from_dlpack(t) for t in tensors]
        return parts, next(iter(runner(runner.gather(parts)).values())).astype(np.float32, copy=False)

    run.close = runner.close
    return run


class TritonPythonModel:
    """Runs model.pt2 (PyTorch 2), model.plan (TensorRT) or model.onnx (ONNX Runtime) from this version directory."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        plan = os.path.join(version_dir, "model.plan")
        self.engine = None
        if os.path.isfile(os.path.join(version_dir, "model.pt2")):
            gpu = args.get("model_instance_kind") == "GPU"
            device = f"cuda:{int(args.get('model_instance_device_id', 0) or 0)}" if gpu else "cpu"
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from torch_runner import TorchEngine  # the copy beside this file

            self.engine = TorchEngine(version_dir, device, params, int(config.get("max_batch_size", 1)),
                                      log=pb_utils.Logger.log_info)
        elif os.path.isfile(plan):
            self.run = _tensorrt(plan, int(args.get("model_instance_device_id", 0) or 0))
        else:
            self.run = _onnxruntime(os.path.join(version_dir, "model.onnx"), params)

    def execute(self, requests):
        if self.engine is not None:
            inputs, logits = self._run_torch(requests)
        else:
            inputs, logits = self.run(self.input_name,
                                      [pb_utils.get_input_tensor_by_name(r, self.input_name) for r in requests])
        responses, start = [], 0
        for rows in (x.shape[0] for x in inputs):  # requests of a dynamic batch ran as one call: split it back
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(self.output_name, logits[start:start + rows])]))
            start += rows
        return responses

    def finalize(self):
        """Releases the TensorRT runner's context and buffers when Triton unloads the model."""
        close = getattr(getattr(self, "run", None), "close", None)
        if close is not None:
            close()

    def _run_torch(self, requests):
        """Pixels in on the GPU by DLPack (no host copy); logits out with one device-to-host copy per batch.

        The logits (4 KB per image) go to the CPU postprocess model anyway; one
        copy of the whole batch is far cheaper than handing each request's
        slice over as a GPU tensor, which the Python backend moves one by one
        (measured on an H100: compute_output 30 ms -> see perf/results).
        """
        from torch.utils.dlpack import from_dlpack

        torch = self.engine.torch
        tensors = [from_dlpack(pb_utils.get_input_tensor_by_name(r, self.input_name).to_dlpack()) for r in requests]
        return tensors, self.engine(torch.cat(tensors) if len(tensors) > 1 else tensors[0]).cpu().numpy()

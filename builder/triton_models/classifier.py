"""Triton Python-backend model: the classifier for servers without native backends (`local` flavor).

The pip-distributed tritonserver has only the Python backend, so the `local`
flavor runs the classifier here, by what the version directory holds:
`model.pt2` (the PyTorch 2 engine: a torch.export program, FP16 on the GPU,
optionally compiled by TorchInductor with CUDA graphs per batch bucket; it
takes its input on the GPU by DLPack and returns logits there), `model.plan`
(TensorRT, through `builder.trt.PlanRunner`, copied beside this file with the
two numpy-only modules it needs), else `model.onnx` on ONNX Runtime.
Its config has the same name, tensors, batching and instance groups as the
native `onnxruntime_onnx` / `tensorrt_plan` models of the `container` flavor,
so clients cannot tell them apart. Requests of a dynamic batch run as one call.
"""

import json
import os
import sys
import time

import numpy as np
import triton_python_backend_utils as pb_utils


def _onnxruntime(path, params):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(path, options, providers=providers)
    return lambda name, batch: session.run(None, {name: batch})[0]


def _tensorrt(path, device):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from builder.trt import PlanRunner  # the copy beside this file

    runner = PlanRunner(path, device=device)
    return lambda name, batch: next(iter(runner(batch).values())).astype(np.float32, copy=False)


class TorchEngine:
    """A torch.export program on one device, batches padded to a few bucket sizes.

    Buckets bound what TorchInductor compiles and what CUDA graphs capture
    (one graph per bucket in reduce-overhead mode); every bucket runs once at
    load, so the first request is as fast as the tenth.
    """

    def __init__(self, version_dir, device, params, max_batch):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        program = torch.export.load(os.path.join(version_dir, "model.pt2")).module().to(self.device)
        fp16 = params.get("precision", "fp16") == "fp16" and self.device.type == "cuda"
        self.dtype = torch.float16 if fp16 else torch.float32
        module = program.half() if fp16 else program
        mode = params.get("compile", "none")
        if mode != "none":
            self._load_artifacts(version_dir)
            module = torch.compile(module, mode=None if mode == "default" else mode, dynamic=True)
        self.module = module
        self.copy_out = mode == "reduce-overhead"  # CUDA graph outputs are overwritten by the next replay
        buckets = sorted({int(b) for b in params.get("batch_buckets", "").split(",") if b.strip()} | {max_batch})
        self.buckets = [b for b in buckets if b <= max_batch]
        started = time.perf_counter()
        for bucket in self.buckets:  # warm-up: compile and capture now, not on a user's request
            self(torch.zeros(bucket, *params_shape(params), device=self.device))
        print(f"classifier: torch {torch.__version__} {self.dtype} on {self.device}, compile={mode}, "
              f"buckets {self.buckets} warmed in {time.perf_counter() - started:.1f} s", flush=True)

    def _load_artifacts(self, version_dir):
        """Inductor's stored compile artifacts, when made by this torch on this GPU."""
        torch = self.torch
        artifacts = os.path.join(version_dir, "inductor.bin")
        sidecar = os.path.join(version_dir, "engine.json")
        if not (os.path.isfile(artifacts) and os.path.isfile(sidecar)):
            return
        with open(sidecar) as f:
            built = json.load(f).get("environment", {})
        here = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(self.device)}
        if any(built.get(k) != v for k, v in here.items()):
            print(f"classifier: ignoring inductor.bin, made for {built} (here {here}); compiling from scratch",
                  flush=True)
            return
        with open(artifacts, "rb") as f:
            torch.compiler.load_cache_artifacts(f.read())

    def __call__(self, batch):
        torch = self.torch
        rows = batch.shape[0]
        bucket = next((b for b in self.buckets if b >= rows), rows)
        with torch.inference_mode():
            x = batch.to(self.device, self.dtype, non_blocking=True)
            if bucket != rows:
                x = torch.cat([x, x.new_zeros((bucket - rows, *x.shape[1:]))])
            logits = self.module(x)[:rows].float()
            return logits.clone() if self.copy_out else logits


def params_shape(params):
    return tuple(int(v) for v in params["input_dims"].split(","))


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
            self.engine = TorchEngine(version_dir, device, params, int(config.get("max_batch_size", 1)))
        elif os.path.isfile(plan):
            self.run = _tensorrt(plan, int(args.get("model_instance_device_id", 0) or 0))
        else:
            self.run = _onnxruntime(os.path.join(version_dir, "model.onnx"), params)

    def execute(self, requests):
        if self.engine is not None:
            return self._execute_torch(requests)
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        batch = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        logits = self.run(self.input_name, batch)
        responses, start = [], 0
        for array in arrays:
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(self.output_name, logits[start:start + len(array)])]))
            start += len(array)
        return responses

    def _execute_torch(self, requests):
        """GPU tensors in and out by DLPack: no host copy between the preprocess model and the postprocess model."""
        from torch.utils.dlpack import from_dlpack, to_dlpack

        torch = self.engine.torch
        tensors = [from_dlpack(pb_utils.get_input_tensor_by_name(r, self.input_name).to_dlpack()) for r in requests]
        logits = self.engine(torch.cat(tensors) if len(tensors) > 1 else tensors[0])
        responses, start = [], 0
        for tensor in tensors:
            part = logits[start:start + len(tensor)]
            start += len(tensor)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack(self.output_name,
                                                                                     to_dlpack(part))]))
        return responses

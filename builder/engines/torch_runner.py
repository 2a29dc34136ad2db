"""The inductor engine's runner: a torch.export program on one device, and the softmax head.

Copied beside the inductor classifier's `model.py` and beside every GPU photo path's (its head serves them all;
`triton_models.SERVED_MODULES`), with `window_attention.py`, which a fused program's op needs. Also run by the
build's engine race and photo-path measurement, `perf bare` and the GPU tools under `perf/gpu/`.
"""

import importlib
import importlib.util
import json
import logging
import os
import time
from importlib.metadata import version

# precision -> (activation dtype, torchao quantization of the Linear layers or None). FP8 rowwise runs
# around BF16: torch's rowwise-scaled FP8 matmul writes BF16 output only.
# fp8-static is this module's own (`quantize_static_fp8`): scales calibrated at build time, no torchao.
PRECISIONS = {"fp32": ("float32", None), "fp16": ("float16", None), "int8": ("float16", "int8-dynamic"),
              "fp8": ("bfloat16", "fp8-rowwise"), "fp8-tensor": ("float16", "fp8-tensor"),
              "fp8-static": ("float16", "fp8-static")}
STATIC_FP8 = "fp8-static"
FP8_MAX = 448.0  # the largest float8_e4m3fn
# The head's logits are the answer: it stays in the activation dtype, like LayerNorm, softmax and the
# attention matmuls (not Linear layers, so never quantized).
KEEP = ("head",)
# TorchInductor's tuning of the compiled kernels (config parameter `inductor_tuning`): none by default. The
# others trade build and load time for kernels timed on this GPU: coordinate descent over the block sizes of
# the fused elementwise and reduction kernels (Swin-T is bound by memory traffic), max-autotune over matmul
# templates as well. CUDA graphs stay this class's own in every case.
TUNINGS = {"none": {}, "coordinate-descent": {"coordinate_descent_tuning": True},
           "max-autotune": {"max_autotune": True, "coordinate_descent_tuning": True}}


def _end_compile_workers():
    """Ends TorchInductor's compile-worker pool once every bucket is compiled.

    The pool (a subprocess with a worker per core) would otherwise live as long as the process and be shut down
    by the interpreter at exit: a served instance's stub ends only then, and Triton unloads a model's instances
    one after another, so eight photo-path instances outlasted tritonserver's 30 s exit timeout on an H100
    (perf/results/h100-as-built). A later compile, if any, starts a new pool.
    """
    from torch._inductor import async_compile

    shutdown = getattr(async_compile, "shutdown_compile_workers", None)
    if shutdown is not None:
        shutdown()


def _register_window_attention():
    """Imports the fused window attention's op (`swin_triton::window_attention`), which a fused program calls: the
    copy beside this file where served, the project's module elsewhere (one of them, so it registers once)."""
    importlib.import_module(f"{__package__}.window_attention" if __package__ else "window_attention")


class TorchEngine:
    """A torch.export program on one device, batches padded to a few bucket sizes.

    Buckets bound what TorchInductor compiles and what CUDA graphs capture
    (one graph per bucket in reduce-overhead mode); every bucket runs once at
    load, so the first request is as fast as the tenth.
    """

    def __init__(self, version_dir, device, params, max_batch, log=None):
        import torch

        # Served models pass Triton's logger; elsewhere (the build's timing, `perf bare`) this module's logger.
        self.log = log or logging.getLogger(__name__).info
        self.torch = torch
        self.device = torch.device(device)
        threads = int(params.get("intra_op_threads", "0"))
        if threads > 0:
            # Each instance is a stub process; torch's default pool has one thread per core in every one of
            # them, while a GPU instance only stacks and copies batches on the CPU.
            torch.set_num_threads(threads)
        attention = params.get("window_attention", "timm")
        if attention == "fused":
            _register_window_attention()
        elif attention != "timm":  # checked on every device, as the tuning below
            raise ValueError(f"window_attention {attention!r} is unknown; use timm or fused")
        module = self._program(version_dir, params.get("precision", "fp16") if self.device.type == "cuda" else "fp32")
        mode = params.get("compile", "none")
        self.tuning = tuning = params.get("inductor_tuning") or "none"
        if tuning not in TUNINGS:  # checked on every device: a repository is often checked without its GPU
            raise ValueError(f"inductor_tuning {tuning!r} is unknown; use one of {', '.join(TUNINGS)}")
        if mode != "none" and self.device.type != "cuda":
            # Inductor's CPU code generation needs a C++ compiler where the model is served and minutes per
            # load for a few percent; CPU instances run the program as exported.
            self.log(f"classifier: compile={mode} applies on CUDA devices; running the program eager on {device}")
            mode = "none"
        if mode != "none":
            self._load_artifacts(version_dir)
            # reduce-overhead: Inductor's kernels, replayed from one CUDA graph per bucket that this class
            # captures itself. torch.compile's own reduce-overhead mode (CUDA graph trees) checks guards and
            # graph state in Python on every call: ~1.1 ms of host time per call on an H200 host, more than
            # Swin-T's whole batch-1 forward pass; a replay of a captured graph costs tens of microseconds.
            module = torch.compile(module, dynamic=True, options=TUNINGS[tuning] or None)
        self.module = module
        self.graphs = {}  # bucket -> (static input, static output, CUDA graph)
        self.capture = mode == "reduce-overhead"
        # It runs on the default stream of its own process (each instance is a stub process with its own CUDA
        # context). A dedicated side stream, synchronized per batch, was measured slower on an H100 with CUDA
        # graphs (classifier 2.0 -> 2.9 ms at concurrency 1, perf/results/h100-gpu-data-path/README.md).
        buckets = sorted({int(b) for b in params.get("batch_buckets", "").split(",") if b.strip()} | {max_batch})
        self.buckets = [b for b in buckets if b <= max_batch]
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if self.capture else None
        shape = params_shape(params)
        # One input buffer of the largest bucket; each graph reads its first rows (a buffer per bucket would
        # hold ~330 MB in every instance with the 19 FP16 buckets of a max batch of 128).
        if self.capture:
            with torch.inference_mode():
                inputs = torch.zeros(max(self.buckets), *shape, device=self.device, dtype=self.dtype)
        for bucket in sorted(self.buckets, reverse=True):  # compile and capture now, not on a user's request
            if self.capture:
                self._capture(inputs[:bucket], pool)
            self(torch.zeros(bucket, *shape, device=self.device))
        if mode != "none":
            _end_compile_workers()
        self.log(f"classifier: torch {torch.__version__} {self.dtype} on {self.device}, compile={mode} "
                 f"(tuning {tuning}), "
                 f"buckets {self.buckets} warmed in {time.perf_counter() - started:.1f} s")

    def _program(self, version_dir, precision: str):
        """The stored program on this engine's device in `precision`'s dtype (`self.dtype`), its Linear layers
        quantized where the precision says so."""
        program = self.torch.export.load(os.path.join(version_dir, "model.pt2")).module().to(self.device)
        self.dtype = getattr(self.torch, PRECISIONS[precision][0])
        module = program.to(self.dtype)
        if PRECISIONS[precision][1] == STATIC_FP8:
            count, folded = quantize_static_fp8(module, _calibration(version_dir))
            self.log(f"classifier: {count} Linear layers as FP8 matrix products with the static scales of "
                     f"engine.json ({folded} fed FP8 by the window attention kernel); the head, LayerNorm, softmax "
                     f"and attention stay {self.dtype}")
        elif PRECISIONS[precision][1]:
            count = quantize_linears(module, precision)
            self.log(f"classifier: {count} Linear layers quantized to {precision} by torchao "
                     f"{_torchao_version()}; the head, LayerNorm, softmax and attention stay {self.dtype}")
        return module

    def _load_artifacts(self, version_dir):
        """Inductor's stored compile artifacts, when made by this torch on this GPU."""
        torch = self.torch
        artifacts = os.path.join(version_dir, "inductor.bin")
        sidecar = os.path.join(version_dir, "engine.json")
        if not (os.path.isfile(artifacts) and os.path.isfile(sidecar)):
            return
        with open(sidecar) as f:
            built = json.load(f).get("environment", {})
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "none"
        here = {"torch": torch.__version__, "cuda": str(torch.version.cuda), "gpu": gpu}
        if any(built.get(k) != v for k, v in here.items()):
            self.log(f"classifier: ignoring inductor.bin, made for {built} (here {here}); compiling from scratch")
            return
        try:  # a damaged file must not stop the model: torch logs it and returns None, or raises
            with open(artifacts, "rb") as f:
                loaded = torch.compiler.load_cache_artifacts(f.read())
            problem = None if loaded is not None else "unreadable"
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            self.log(f"classifier: ignoring inductor.bin ({problem}); compiling from scratch")

    def _capture(self, static_in, pool):
        """Compiles the module for `static_in`'s rows and captures one CUDA graph reading them (largest first).

        The graphs share one memory pool and one input buffer: they replay one at a time on this process's
        stream, and each call copies its rows in before and out after its replay.
        """
        torch = self.torch
        with torch.inference_mode():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # compile, autotune and initialize cuBLAS outside the capture
                for _ in range(2):
                    self.module(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                static_out = self.module(static_in)
        self.graphs[static_in.shape[0]] = (static_in, static_out, graph)

    def __call__(self, batch):
        torch = self.torch
        rows = batch.shape[0]
        bucket = next((b for b in self.buckets if b >= rows), rows)
        with torch.inference_mode():
            captured = self.graphs.get(bucket)
            if captured is not None:
                static_in, static_out, graph = captured
                # Rows past `rows` keep an earlier batch's images: rows are independent through the model.
                static_in[:rows].copy_(batch, non_blocking=True)
                graph.replay()
                # A new tensor: the next replay overwrites static_out.
                return static_out[:rows].to(torch.float32, copy=True)
            x = batch.to(self.device, self.dtype, non_blocking=True)
            if bucket != rows:
                x = torch.cat([x, x.new_zeros((bucket - rows, *x.shape[1:]))])
            return self.module(x)[:rows].float()


def class_outputs_packed(logits):
    """Softmax of float32 logits on their device, packed as rows of [probabilities | logits].

    The photo path's head: one tensor so that one device-to-host copy brings both back (each `.cpu()`
    synchronizes). Top-k and class names are Triton's classification extension on these outputs.
    """
    import torch

    return torch.cat([torch.softmax(logits, dim=1), logits], dim=1)


def params_shape(params):
    """The input's shape without the batch axis, from the config parameter `input_dims`."""
    return tuple(int(v) for v in params["input_dims"].split(","))


def _torchao_version():
    return version("torchao")


def _quantization_config(scheme):
    if importlib.util.find_spec("torchao") is None:
        raise RuntimeError(f"this classifier was built with {scheme} Linear layers, which need torchao in the "
                           "serving Python (pip install torchao); or rebuild with --inductor-precision fp16")
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int8DynamicActivationInt8WeightConfig,
                                      PerRow, PerTensor)

    # set_inductor_config=False: torchao's default turns on Inductor's coordinate-descent tuning in all
    # directions, process-wide, which benchmarks every kernel variant of every shape on first use: Swin-T
    # with dynamic batch buckets had not finished compiling after 9.5 minutes on an H200; without it, fp16,
    # int8, fp8 and fp8-tensor compiled side by side in 95-120 s (perf/results/h200-precisions/).
    if scheme == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if scheme == "fp8-rowwise" else PerTensor(),
                                                     set_inductor_config=False)


def quantize_linears(module, precision, keep=KEEP):
    """Quantizes the Linear layers of a torch.export program's module in place with torchao; returns how many.

    torchao quantizes `nn.Linear` modules, and an exported program has none: its linears are `aten.linear`
    calls on parameters. Each weight is quantized through a throwaway `nn.Linear` and put back, and the call
    becomes `F.linear`, which torchao's tensors implement (`aten.linear` would decompose before reaching them).
    Activations are quantized at run time per row or tensor (dynamic scales): no calibration data.
    """
    import torch

    config = _quantization_config(PRECISIONS[precision][1])  # first: it says what to install without torchao
    from torchao.quantization import quantize_

    count = 0
    for node, weight in _linear_calls(module, keep):
        path, _, name = weight.target.rpartition(".")
        owner = module.get_submodule(path) if path else module
        tensor = getattr(owner, name)
        linear = torch.nn.Linear(tensor.shape[1], tensor.shape[0], bias=False, device=tensor.device,
                                 dtype=tensor.dtype)
        linear.weight = torch.nn.Parameter(tensor.detach(), requires_grad=False)
        quantize_(linear, config)
        setattr(owner, name, linear.weight)
        node.target = torch.nn.functional.linear
        count += 1
    module.recompile()
    return count


def _linear_calls(module, keep):
    """The linear calls of a torch.export program's module whose weight is one of its attributes, outside `keep`:
    (call node, weight node), listed first so that callers may rewrite the graph."""
    import torch

    calls = []
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.linear.default,
                                                             torch.nn.functional.linear):
            continue
        weight = node.args[1]
        if weight.op == "get_attr" and not weight.target.startswith(keep):
            calls.append((node, weight))
    return calls


def _calibration(version_dir):
    """The static FP8 input scales' calibration the build recorded in engine.json (`quantization.input_amax`)."""
    path = os.path.join(version_dir, "engine.json")
    try:
        with open(path) as f:
            amax = json.load(f)["quantization"]["input_amax"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"this classifier was built with fp8-static Linear layers and {path} holds no "
                           f"calibration ({type(exc).__name__}: {exc}); rebuild the repository") from None
    return amax


def _fp8_linear(x, weight, weight_scale, input_scale, input_inverse, bias):
    """x @ weightᵀ + bias as one FP8 matrix product: x quantized with its static scale (a multiply, clamp and
    cast that Inductor fuses into the kernel producing x: no amax pass), weight stored in FP8."""
    import torch

    quantized = (x.float() * input_inverse).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return _fp8_matmul(quantized, weight, weight_scale, input_scale, bias, x.dtype)


def _fp8_linear_quantized(quantized, weight, weight_scale, input_scale, bias):
    """`_fp8_linear` on an input that its producing kernel already wrote in FP8 with the static scale (the fused
    window attention's output); the output in the bias's dtype."""
    return _fp8_matmul(quantized, weight, weight_scale, input_scale, bias, bias.dtype)


def _fp8_matmul(quantized, weight, weight_scale, input_scale, bias, dtype):
    """The scaled FP8 matrix product over the last dimension, the bias added in its epilogue."""
    import torch

    rows = quantized.reshape(-1, quantized.shape[-1])
    out = torch._scaled_mm(rows, weight.t(), scale_a=input_scale, scale_b=weight_scale,
                           bias=None if bias is None else bias.to(dtype), out_dtype=dtype)
    return out.view(*quantized.shape[:-1], out.shape[-1])


# The fused window attention's op as a torch.export graph names it (`window_attention.py`); a Linear layer reading
# only its output gets its FP8 input from the op's FP8 form.
FUSED_ATTENTION = "swin_triton.window_attention.default"


def _fused_attention_input(node, bias):
    """The fused window attention call whose output only this linear call reads (None: any other input)."""
    producer = node.args[0]
    if (bias is None or getattr(producer, "op", "") != "call_function" or str(producer.target) != FUSED_ATTENTION
            or len(producer.users) != 1 or producer.kwargs or len(producer.args) != 5):
        return None
    return producer


def quantize_static_fp8(module, input_amax, keep=KEEP):
    """Every calibrated Linear layer of a torch.export program's module as one FP8 (e4m3) matrix product with
    per-tensor static scales; returns how many, and how many of them read an input that the fused window
    attention kernel writes in FP8 itself.

    The weight's scale is its own absolute maximum over 448; the input's, the absolute maximum the build measured
    on photos (`input_amax`, by module name: `layers.0.blocks.0.attn.qkv`) over 448. Each `aten.linear` call
    becomes `_fp8_linear` on the FP8 weight and the scales, stored as the module's buffers beside the weight.
    Inductor folds that quantize into the kernel producing the input, except where the producer is the fused
    attention, a kernel of its own: there the attention's op is swapped for its FP8 form, which applies the scale
    as it stores (`swin_triton::window_attention_fp8`), and the call for `_fp8_linear_quantized`.
    The head (`keep`) stays in the activation dtype: its logits are the answer.
    """
    import torch

    count, folded, replaced = 0, 0, []
    graph = module.graph
    for node, weight in _linear_calls(module, keep):
        layer = weight.target.rpartition(".")[0]
        if layer not in input_amax:
            continue
        owner = module.get_submodule(layer)
        tensor = owner.weight.detach().float()
        if tensor.shape[0] % 16 or tensor.shape[1] % 16:  # FP8 matrix products take multiples of 16 only
            continue
        weight_scale = tensor.abs().amax().clamp(min=1e-12) / FP8_MAX
        input_scale = torch.tensor(max(float(input_amax[layer]), 1e-12) / FP8_MAX, device=tensor.device)
        buffers = {"weight_fp8": (tensor / weight_scale).to(torch.float8_e4m3fn),
                   "weight_scale": weight_scale.reshape(()), "input_scale": input_scale,
                   "input_inverse": 1.0 / input_scale}
        for name, value in buffers.items():
            owner.register_buffer(name, value)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        attention = _fused_attention_input(node, bias)
        with graph.inserting_before(attention or node):
            attrs = {name: graph.get_attr(f"{layer}.{name}") for name in buffers}
        node.kwargs = {}
        if attention is None:
            node.target = _fp8_linear
            node.args = (node.args[0], attrs["weight_fp8"], attrs["weight_scale"], attrs["input_scale"],
                         attrs["input_inverse"], bias)
        else:
            attention.target = torch.ops.swin_triton.window_attention_fp8.default
            attention.args = (*attention.args, attrs["input_inverse"], FP8_MAX)
            node.target = _fp8_linear_quantized
            node.args = (attention, attrs["weight_fp8"], attrs["weight_scale"], attrs["input_scale"], bias)
            folded += 1
        replaced.append(weight)
        count += 1
    for weight in replaced:  # the higher-precision weights no call reads any more: not kept in GPU memory
        if not weight.users:
            path, _, name = weight.target.rpartition(".")
            graph.erase_node(weight)
            delattr(module.get_submodule(path), name)
    module.recompile()
    return count, folded

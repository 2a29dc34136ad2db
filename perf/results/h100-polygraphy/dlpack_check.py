"""GPU-host check (a Python with torch and polygraphy): device_view_from_dlpack wraps torch CUDA tensors, no copy."""
import json

import numpy as np
import torch

from builder.engines.plan_runner import device_view_from_dlpack
from builder.errors import BuilderError

x = torch.randn(8, 3, 224, 224, device="cuda")
out = {}
v = device_view_from_dlpack(x.__dlpack__())
out["capsule_same_pointer"] = v.ptr == x.data_ptr()
out["capsule_values_equal"] = bool(np.array_equal(v.numpy(), x.cpu().numpy()))
rows = x[2:5]
v = device_view_from_dlpack(rows)
out["slice_same_pointer"] = v.ptr == rows.data_ptr() and tuple(v.shape) == (3, 3, 224, 224)
out["slice_values_equal"] = bool(np.array_equal(v.numpy(), rows.cpu().numpy()))
h = x.half()
v = device_view_from_dlpack(h)
out["fp16_values_equal"] = bool(np.array_equal(v.numpy(), h.cpu().numpy()))
for name, bad in (("channels_last_refused", x.permute(0, 2, 3, 1)), ("host_refused", x.cpu()),
                  ("int_refused", x.int())):
    try:
        device_view_from_dlpack(bad)
        out[name] = False
    except BuilderError as exc:
        out[name] = str(exc)
print(json.dumps(out))

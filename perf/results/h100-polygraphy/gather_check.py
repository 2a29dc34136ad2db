"""GPU-host check (a Python with tensorrt and polygraphy): host arrays, a device view and a gathered mix agree."""
import json
import sys

import numpy as np
from polygraphy import cuda

from builder.engines.plan_runner import PlanRunner

plan, reference = sys.argv[1], sys.argv[2]
runner = PlanRunner(plan)
data = np.ascontiguousarray(np.load(reference)["inputs"][:12].astype(np.float32))
name = runner.outputs[0]
whole = runner(data)[name]
a, b = cuda.DeviceArray(shape=(4, *data.shape[1:])), cuda.DeviceArray(shape=(5, *data.shape[1:]))
a.copy_from(data[:4])
b.copy_from(data[4:9])
single = runner(a)[name]
mixed = runner(runner.gather([a, b, data[9:]]))[name]
print(json.dumps({"device_view_max_abs": float(np.abs(single - whole[:4]).max()),
                  "gathered_mix_max_abs": float(np.abs(mixed - whole).max()), "rows": len(mixed)}))

"""The extend kernel alone for a profiler: 32/8 heads, d=128, oscar-2, page 64, 24k cached + 512 and + 128
new tokens, one launch each (bench/extend.py's setup). Profiled with
    ncu --kernel-name regex:extend_kernel --launch-count 2 --section SpeedOfLight --section WarpStateStats \\
        --section SchedulerStats --section InstructionStats ... python3 bench/extend_profile.py
→ bench/results/extend_h100.ncu.txt."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import extend as bx  # noqa: E402
from sglang_oscar.extend import fill_scratch, run_extend  # noqa: E402

for S, T in ((24576, 512), (24576, 128)):
    be, layer, fb, q, k, v = bx.setup(32, 8, 128, S, T, True)
    be.init_forward_metadata(fb)
    plan = be._extend_batch
    plan.use_flash = False
    pages, res_k, res_v = be.token_to_kv_pool.layer(0)
    raw_k, raw_v = fill_scratch(k, v, res_k, res_v, plan)
    torch.cuda.synchronize()
    run_extend(q.view(T, 32, 128), pages, raw_k, raw_v, plan, be.cfg, layer.scaling)
    torch.cuda.synchronize()

"""Where one training step's time goes, op by op: ``torch.profiler`` over one step of
``benchmarks/bench_step.py`` after warm-up, the ops sorted by their own time.

    python -m benchmarks.profile_step                    # paper-size CLIP and DeCLIP steps
    python -m benchmarks.profile_step --impl declip --host-memory system --case tiny-b128

``--host-memory`` sets the process up as the trainer would (``distributed.env.setup``): compare
``retain`` (the default) with ``system`` to see the element-wise ops pay for page faults. Also
printed: the minor page faults of the profiled step. It is a tool for reading, not a benchmark
(the profiler adds its own overhead); ``bench_step`` / ``bench_host_memory`` give the numbers.
"""

from __future__ import annotations

import argparse
import resource
import time

from torch.profiler import ProfilerActivity, profile


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", action="append", choices=["open_clip", "ours", "ours_padded", "declip"])
    parser.add_argument("--case", default="vit_b32-b16")
    parser.add_argument("--host-memory", default="retain", choices=["retain", "system"])
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)

    from benchmarks import bench_step
    from declip_fast.distributed import env

    env.setup(bench_step.DEVICE.type, host_memory=args.host_memory)
    for impl in args.impl or ["ours", "declip"]:
        step = bench_step.build_step(args.case, impl)
        for _ in range(2):
            step()
        bench_step._sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench_step.ON_GPU else [])
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        with profile(activities=activities) as prof:
            step()
            bench_step._sync()
        seconds = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(f"\n== {impl}, {args.case}, host_memory={args.host_memory}: {seconds:.2f} s, {faults:,} minor faults")
        sort = "self_cuda_time_total" if bench_step.ON_GPU else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()

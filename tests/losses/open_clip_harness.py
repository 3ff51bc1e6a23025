"""Runs OpenCLIP's trainer several times in one process and records every loss it computes.

    python tests/losses/open_clip_harness.py PLAN.json

PLAN.json: ``{"record": path, "runs": [{"name", "ours", "argv"}, ...]}``. Each run is one call of
``open_clip_train.main.main(argv)`` (``"ours": false``: OpenCLIP's losses) or of
``declip_fast.integrations.open_clip_train.main(argv)`` (``"ours": true``: the trainer with our
losses swapped in, which stays installed for the rest of the process, so OpenCLIP's runs come
first). One process for many runs: torch, OpenCLIP and the tokenizer load once.

Per run and rank it records the loss object's class and, per step, the full-precision value and
dtype of every term the loss returns (a forward hook on the object ``create_loss`` builds), into
``record.rank<R>.json``: ``{name: {"cls": "module.Class", "world_size", "steps": [{term: value}],
"dtypes": [...], "seconds"}}``.

With ``WORLD_SIZE`` > 1 in the environment (and ``RANK``), each run joins a gloo group through
OpenCLIP's own init (``--dist-backend gloo``, a ``file://`` rendezvous per run, no ports), and
``DistributedDataParallel`` gets no ``device_ids`` for a CPU model: OpenCLIP passes
``device_ids=[cpu]``, which torch 2.x refuses on the CPU.

CoCa's text decoder's projection is initialised (see ``_initialised``).

``DECLIP_OCT_MUTANT=Class:delta`` (tests of the test): our ``Class`` returns every term plus
``delta`` in the swapped runs.
"""

import json
import logging
import os
import subprocess
import sys
import time


def _recording(create_loss, record, name, mutant):
    """``create_loss`` whose loss object records each forward's terms into ``record[name]``."""

    def create(args):
        loss = create_loss(args)
        cls = f"{type(loss).__module__}.{type(loss).__name__}"
        world = getattr(loss, "world_size", None)
        entry = record[name] = {"cls": cls, "world_size": world, "steps": [], "dtypes": []}
        shift = None
        if mutant and cls.startswith("declip_fast.") and type(loss).__name__ == mutant.split(":")[0]:
            shift = float(mutant.split(":")[1])

        def hook(module, inputs, output):
            if shift is not None:
                output = {k: v + shift for k, v in output.items()}
            entry["steps"].append({k: v.item() for k, v in output.items()})
            entry["dtypes"].append(sorted({str(v.dtype) for v in output.values()}))
            return output

        loss.register_forward_hook(hook)
        return loss

    return create


def _cpu_ddp():
    """``DistributedDataParallel`` without ``device_ids`` for CPU devices (torch refuses them)."""
    import torch

    base = torch.nn.parallel.DistributedDataParallel

    class CpuDDP(base):
        def __init__(self, module, device_ids=None, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids=device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDDP


def _initialised(create_model_and_transforms):
    """``create_model_and_transforms`` that also initialises the ``text_projection`` of CoCa's text
    decoder as its ``init_parameters`` means to (which OpenCLIP never calls, and which fails if
    called): otherwise it is ``torch.empty`` memory, zeros in a fresh process (all caption logits
    0) and whatever earlier runs left in this one."""
    import torch

    def create(*args, **kwargs):
        model, *transforms = create_model_and_transforms(*args, **kwargs)
        decoder = getattr(model, "text_decoder", None)
        if decoder is not None:
            torch.nn.init.normal_(decoder.text_projection, std=decoder.width**-0.5)
        return (model, *transforms)

    return create


def _reset_logging():
    """OpenCLIP's ``setup_logging`` adds root handlers per run: close and drop them."""
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)
        handler.close()


def run(plan_path):
    import torch.distributed as dist

    import open_clip_train.main as train_main
    from declip_fast.integrations import open_clip_train as integration

    with open(plan_path) as f:
        plan = json.load(f)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    mutant = os.environ.get("DECLIP_OCT_MUTANT")
    _cpu_ddp()
    train_main.create_model_and_transforms = _initialised(train_main.create_model_and_transforms)
    create_loss = train_main.create_loss
    record = {}
    swapped = False
    try:
        for item in plan["runs"]:
            name, argv = item["name"], list(item["argv"])
            assert not (swapped and not item["ours"]), "OpenCLIP's runs go before ours"
            if world > 1:
                rdzv = os.path.join(os.path.dirname(plan["record"]), f"{name}.rdzv")
                argv += ["--dist-backend", "gloo", "--dist-url", f"file://{rdzv}?rank={rank}&world_size={world}"]
            train_main.create_loss = _recording(create_loss, record, name, mutant)
            start = time.perf_counter()
            if item["ours"]:
                swapped = True
                integration.main(argv)
            else:
                train_main.main(argv)
            record[name]["seconds"] = time.perf_counter() - start
            if dist.is_initialized():
                dist.destroy_process_group()
            _reset_logging()
    finally:
        with open(f"{plan['record']}.rank{rank}.json", "w") as f:
            json.dump(record, f)


# -- the test side


def dataset(root, n=24):
    """``n`` 40 px JPEGs (a colour and a stripe each) and a caption naming them, as a CSV."""
    from PIL import Image

    rows = ["filepath,title"]
    colours = ["red", "green", "blue", "yellow"]
    values = [(220, 30, 30), (30, 200, 40), (40, 50, 230), (230, 220, 40)]
    for i in range(n):
        c = i % len(colours)
        image = Image.new("RGB", (40, 40), values[c])
        for x in range(0, 40, 2 + i % 5):
            image.paste((255, 255, 255), (x, 0, x + 1, 40))
        path = root / f"{i}.jpg"
        image.save(path, quality=90)
        rows.append(f"{path},a {colours[c]} square with {2 + i % 5} pixel stripes")
    csv = root / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def local_model(root, name, cfg):
    """A ``local-dir:`` model OpenCLIP builds from its config alone (random weights)."""
    folder = root / name
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return f"local-dir:{folder}"


def trainer_argv(csv, logs, name, *extra, precision="fp32", batch=8):
    """The trainer's arguments for one epoch over ``csv`` (24 pairs: 3 steps of 8) on the CPU."""
    argv = ["--train-data", str(csv), "--dataset-type", "csv", "--csv-separator", ","]
    argv += ["--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", str(batch), "--epochs", "1"]
    argv += ["--workers", "0", "--precision", precision, "--device", "cpu", "--lr", "1e-3", "--warmup", "1"]
    argv += ["--save-frequency", "0", "--zeroshot-frequency", "0", "--log-every-n-steps", "1"]
    return argv + ["--logs", str(logs), "--name", name, "--seed", "0", *extra]


def launch(folder, runs, world=1, env=None, timeout=600):
    """``runs`` (see the module docstring) in ``world`` processes of this script, in ``folder``:
    ``({rank: record}, rank 0's stderr)``. Fails with the stderr of a process that failed."""
    plan, record = folder / "plan.json", folder / "record"
    plan.write_text(json.dumps({"record": str(record), "runs": runs}))
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    base.update(env or {})
    if world > 1:
        base["OMP_NUM_THREADS"] = "1"  # 2 ranks on 2 cores
    procs, logs = [], []
    for rank in range(world):
        rank_env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)} if world > 1 else base
        logs.append(open(folder / f"stderr.rank{rank}", "w+"))
        cmd = [sys.executable, os.path.abspath(__file__), str(plan)]
        procs.append(subprocess.Popen(cmd, env=rank_env, stdout=subprocess.DEVNULL, stderr=logs[-1], text=True))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    stderr = []
    for log in logs:
        log.seek(0)
        stderr.append(log.read())
        log.close()
    for rank, code in enumerate(codes):
        assert code == 0, f"rank {rank} exited {code}:\n{stderr[rank][-3000:]}"
    return {r: json.loads((folder / f"record.rank{r}.json").read_text()) for r in range(world)}, stderr[0]


if __name__ == "__main__":
    run(sys.argv[1])

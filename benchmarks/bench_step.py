"""One whole training step (forward, loss, backward, AdamW step): declip_fast's CLIP step against
OpenCLIP's on the same architecture, and our DeCLIP step against our CLIP step.

Steps, per case (one ``case`` param; ``impl`` says whose step):

- ``open_clip``: ``open_clip.model.CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu=True)`` built
  from a config equal to our preset's (the ViT-B/32 one is OpenCLIP's ``ViT-B-32-quickgelu``),
  ``open_clip.loss.ClipLoss``, padded ``[B, 77]`` captions (OpenCLIP has no other text path);
- ``ours``: ``presets.build("clip_*")``, ``declip_fast.losses.ClipLoss`` on the normalised
  features, the text tower on PACKED captions (the default: each caption's own tokens only), the
  caption lengths handed over as a host list, as the trainer does;
- ``ours_padded``: the same with ``model.text.cfg.packed = False`` (the padded 77 tokens), so the
  gain of packing shows apart from the rest;
- ``declip``: ``presets.build("declip_*")`` with ``DeCLIPLoss("released")``: two image views, the
  masked caption (``data.masking.mask_tokens``, MLM through the head) and an EDA-like second
  caption (the first word deleted), SimSiam, NNS against a full queue (steady state).

The process is set up as the trainer sets it up (``distributed.env.setup``): on the CPU that keeps
freed tensor memory in the process (``distributed.host_memory``; before / after in
``benchmarks/bench_host_memory.py``). It is process-wide, so OpenCLIP's step gets it too.

Optimizers: each library's trainer's AdamW. OpenCLIP's ``open_clip_train.main`` builds
``torch.optim.AdamW`` with torch's defaults (the per-parameter loop on the CPU, ``foreach`` on
CUDA); ours is the trainer's ``train.optim.build_optimizer`` (``fused=True`` where the device has
it, the CPU included). ``test_optimizer_update`` times the update alone both ways. The
parameter counts are checked equal up to our ``<mask>`` embedding row (49,409 vs 49,408 rows:
``text width`` more parameters) and printed.

Cases: the tiny presets (``clip_tiny`` / ``declip_tiny``) at batch 128, and the paper's ViT-B/32
with the 12-layer text tower (``clip_vit_b32`` / ``declip_vit_b32``, 224 px) at batch 16 on the
CPU (fp32) or 256 on a GPU (bf16 autocast over fp32 parameters). ``BENCH_STEP_QUICK=1``: only the
tiny case at batch 16 (a smoke test). ``BENCH_STEP_COMPILE=1`` (GPU only): ``torch.compile`` on
every ViT block (ours and OpenCLIP's alike; the text towers stay eager, since packed captions give
every step a new shape).

Captions. Cost, not content, is measured, but the text tower's cost depends on the caption
lengths once packed, so they are drawn as web alt-text is long: the length in BPE tokens including
the start and end tokens is ``2 + round(X)``, ``X ~ lognormal(median 12, sigma 0.55)`` (at least
one word), clipped to 77 (a truncated caption ends with EOT at position 76, as CLIP's tokenizer
does). That puts 80% of captions between 8 and 26 tokens (mean ~16, median 14) with a long tail
to 77: CC3M's captions average ~10 words (~12 BPE tokens), LAION's alt-texts are longer and
heavy-tailed. Token ids are uniform in [1, 49406), SOT = 49406 at 0, EOT = 49407 at the end,
zeros after; fixed seed. Images are Gaussian noise of the model's size. The data is built once,
on the device, before timing: the data-wait share is 0 by construction (reported as such).

Reported per step: the median over ``rounds`` timed steps after ``warmup`` ones (``Case``: on the
CPU 3 + 1 for ViT-B/32, a step of seconds, and 10 + 2 for the tiny case, whose ~0.1 s steps are
noisier; 10 + 3 on a GPU), images/s (batch / step; for DeCLIP image-text pairs/s, each pair having
two image views), ours / OpenCLIP images/s (above 1: ours faster), and the FLOPs of one step
(forward + backward, not the optimizer) counted by ``torch.utils.flop_counter.FlopCounterMode`` on
one eager step before timing, the achieved FLOP/s (FLOPs / median step) and its fraction of the
device's peak measured in the same run (GPU: bf16 matmul, ``peaks.gpu_bf16_matmul_tflops``: the
MFU; CPU: the best fp32 rate of a 2048^3 product, ``peaks.cpu_fp32_matmul_gflops(2048, 2048)``,
measured before every step and the best so far used).
FlopCounterMode counts matrix products, convolutions and attention (attention as dense: a causal
mask's skipped half is counted too); on the CPU the flash-attention op it does not know is added
with its SDPA formula, on a GPU our attention is switched to SDPA for the counting step (xformers'
kernels are opaque to it). What runs inside Triton kernels (our fused losses on a GPU) is not seen:
the MLM decoder, ~1-2% of a ViT-B/32 DeCLIP step, and the contrastive logits, far less. FLOPs are
what each step executes: the padded text tower counts its 77 positions, the packed one its tokens
(plus the SDPA fallback's bucket padding). On the CPU the counting step runs at one intra-op thread:
our tiled CPU kernels (``kernels.cpu_threads``) otherwise run their blocks in Python worker threads,
which the thread-local FlopCounterMode does not see (the MLM decoder and the NNS lookup would go
uncounted).

Shares of our steps (second table): each part timed alone, the step's number of rounds, right
after the steps (so warm; one more warm-up call each, except for the CPU's ViT-B/32). The parts
do not overlap in a step (one stream, eager), so they should nearly add up:

- image towers: ``visual`` forward + backward on every image view as the model runs them (one
  pass per view on the CPU, the views concatenated on a GPU), with a fixed random output gradient;
- text towers: ``text`` forward + backward on every text view, with the lengths (and the token
  states for the MLM head in DeCLIP), likewise;
- heads + losses: the model's forward with both towers replaced by stubs returning their (leaf)
  outputs, i.e. the normalisation, SimSiam and MLM heads, then the loss and the backward of it all;
- optimizer: ``optimizer.step()`` alone;
- data wait: 0 (synthetic data, preloaded on the device);
- rest: the step minus the parts (``zero_grad``, and what timing parts alone misses or adds).

DeCLIP against CLIP (third table): time ratio (DeCLIP step / our packed CLIP step), FLOP ratio,
and achieved-FLOP/s ratio (above 1: DeCLIP keeps the device busier per second). The same ratios
again from ``test_declip_vs_clip_interleaved``, which takes the two steps in turn (at least 5
rounds each), so that the CPU's busy spells land on both: the steadier number on a shared machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from benchmarks.machine import intra_op_threads
from declip_fast.data import masking
from declip_fast.distributed import env
from declip_fast.losses import ClipLoss, DeCLIPLoss
from declip_fast.models import presets
from declip_fast.models.attention import Attention
from declip_fast.models.declip import _encode_views
from declip_fast.models.text import EOT_ID, OPENCLIP_VOCAB_SIZE, SOT_ID
from declip_fast.train.optim import OptimConfig, build_optimizer

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
QUICK = os.environ.get("BENCH_STEP_QUICK") == "1"
COMPILE = ON_GPU and os.environ.get("BENCH_STEP_COMPILE") == "1"


@dataclass(frozen=True)
class Case:
    size: str  # a PRESETS key
    batch: int
    rounds: int  # timed steps (and timed calls of each part)
    warmup: int  # untimed steps first
    part_warmup: int  # untimed calls of each part first (after the steps, so already warm)


PAPER = Case("vit_b32", 256, 10, 3, 1) if ON_GPU else Case("vit_b32", 16, 3, 1, 0)
TINY = Case("tiny", 128, 10, 3 if ON_GPU else 2, 1)
CASES = (
    {"tiny-b16": dataclasses.replace(TINY, batch=16)}
    if QUICK
    else {f"tiny-b{TINY.batch}": TINY, f"vit_b32-b{PAPER.batch}": PAPER}
)
PRESETS = {"tiny": ("clip_tiny", "declip_tiny"), "vit_b32": ("clip_vit_b32", "declip_vit_b32")}
IMPLS = ["open_clip", "ours", "ours_padded", "declip"]
LABELS = {
    "open_clip": "OpenCLIP CLIP",
    "ours": "ours CLIP, packed text",
    "ours_padded": "ours CLIP, padded text",
    "declip": "ours DeCLIP (released)",
}
DTYPE = "bf16 autocast" if ON_GPU else "fp32"
MEDIAN_WORDS, SIGMA = 12.0, 0.55  # caption BPE tokens between SOT and EOT: lognormal
SEED = 0
# (case, impl) -> measured numbers; filled as the tests run, read by the tables.
_results: dict[tuple[str, str], dict] = {}


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def _autocast():
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=ON_GPU)


def _median_time(fn: Callable[[], object], rounds: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- data ------------------------------------------------------------------------------------


def captions(batch: int, context: int, gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """Padded token ids ``[batch, context]`` and each caption's length up to and including EOT
    (the distribution of the module docstring)."""
    words = torch.exp(torch.randn(batch, generator=gen) * SIGMA) * MEDIAN_WORDS
    lengths = torch.clamp(torch.round(words).clamp(min=1) + 2, max=context).long()
    ids = torch.randint(1, SOT_ID, (batch, context), generator=gen)
    pos = torch.arange(context)
    tokens = torch.where(pos < lengths[:, None] - 1, ids, torch.zeros_like(ids))
    tokens[:, 0] = SOT_ID
    tokens[torch.arange(batch), lengths - 1] = EOT_ID
    return tokens, lengths.tolist()


def eda_view(tokens: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
    """An EDA-like second caption: the first word deleted where a caption has two or more."""
    out, new = tokens.clone(), []
    for row, n in enumerate(lengths):
        if n > 3:
            out[row, 1 : n - 1] = tokens[row, 2:n]
            out[row, n - 1] = 0
            n -= 1
        new.append(n)
    return out, new


# ---- FLOPs -----------------------------------------------------------------------------------


def _cpu_flash_fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# The CPU's SDPA kernel, which FlopCounterMode's registry lacks (shapes are BHSD, as SDPA's).
CUSTOM_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_fwd,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd,
}


@contextlib.contextmanager
def _sdpa_attention(model: nn.Module):
    """Our attention modules on SDPA (which FlopCounterMode sees) instead of xformers."""
    mods = [m for m in model.modules() if isinstance(m, Attention)]
    old = [m.backend for m in mods]
    for m in mods:
        m.backend = "sdpa"
    try:
        yield
    finally:
        for m, b in zip(mods, old):
            m.backend = b


def count_flops(fn: Callable[[], object], model: nn.Module) -> int:
    """FLOPs of one call of ``fn`` (forward + backward), eager."""
    # One intra-op thread on the CPU: our tiled CPU kernels (MLM linear cross-entropy, contrastive
    # loss, NNS lookup; ``kernels.cpu_threads``) then run their blocks on the caller's thread, not
    # in Python worker threads, where the thread-local FlopCounterMode would not see them.
    single = contextlib.nullcontext() if ON_GPU else intra_op_threads(1)
    with single, _sdpa_attention(model), FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        fn()
    _sync()
    return counter.get_total_flops()


# ---- the steps -------------------------------------------------------------------------------


@dataclass
class Step:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    forward_backward: Callable[[], object]
    batch: int
    preset: str
    inputs: dict = field(default_factory=dict)
    loss: Callable[[dict], torch.Tensor] | None = None  # ours: model output -> total loss

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_backward()
        self.optimizer.step()


def open_clip_model(cfg) -> nn.Module:
    """OpenCLIP's CLIP with our preset's towers (``cfg``: a ``DeCLIPConfig`` with a ViT)."""
    import open_clip

    v, t = cfg.vision, cfg.text
    vision_cfg = dict(
        image_size=v.image_size,
        patch_size=v.patch_size,
        width=v.width,
        layers=v.layers,
        head_width=v.width // v.heads,
        mlp_ratio=v.mlp_ratio,
    )
    text_cfg = dict(
        context_length=t.context_length,
        vocab_size=OPENCLIP_VOCAB_SIZE,
        width=t.width,
        heads=t.heads,
        layers=t.layers,
        mlp_ratio=t.mlp_ratio,
    )
    quick = v.act == t.act == "quick_gelu"
    return open_clip.model.CLIP(cfg.embed_dim, vision_cfg, text_cfg, quick_gelu=quick)


def build_step(case: str, impl: str) -> Step:
    size, batch = CASES[case].size, CASES[case].batch
    clip_preset, declip_preset = PRESETS[size]
    preset = declip_preset if impl == "declip" else clip_preset
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    cfg = presets.get_config(preset)
    context, image_size = cfg.text.context_length, cfg.vision.image_size
    images = [torch.randn(batch, 3, image_size, image_size, generator=gen).to(DEVICE) for _ in range(2)]
    tokens, lengths = captions(batch, context, gen)
    # Each library's trainer's optimizer: OpenCLIP's main builds torch.optim.AdamW with torch's
    # defaults (the for-loop update on the CPU, foreach on CUDA); ours is train.optim.build_optimizer
    # (fused AdamW where the device has it: CUDA and, in recent torch, the CPU).
    theirs_optim = lambda model: torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)  # noqa: E731
    optim = lambda model: build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.1))  # noqa: E731

    if impl == "open_clip":
        from open_clip.loss import ClipLoss as OpenClipLoss

        model = open_clip_model(cfg).to(DEVICE)
        loss_fn = OpenClipLoss()
        text = tokens.to(DEVICE)

        def forward_backward():
            with _autocast():
                image_features, text_features, logit_scale = model(images[0], text)
                loss = loss_fn(image_features, text_features, logit_scale)
            loss.backward()

        return Step(model, theirs_optim(model), forward_backward, batch, "open_clip " + preset)

    model = presets.build(preset, device=DEVICE)
    if impl == "ours_padded":
        model.text.cfg.packed = False
    if impl == "declip":
        loss_fn = DeCLIPLoss("released", embed_dim=model.config.embed_dim, device=DEVICE)
        queue = loss_fn.nns.queue  # steady state: the lookup scans a full queue
        while len(queue) < queue.size:
            rows = torch.randn(min(4096, queue.size - len(queue)), queue.dim, generator=gen)
            queue.enqueue(nn.functional.normalize(rows, dim=-1).to(queue.rows.device))
        masked, targets = masking.mask_tokens(tokens, generator=gen)
        text_2, lengths_2 = eda_view(tokens, lengths)
        inputs = dict(
            images_1=images[0],
            images_2=images[1],
            text_1=masked.to(DEVICE),
            text_2=text_2.to(DEVICE),
            mlm_targets=targets.to(DEVICE),
            text_1_lengths=lengths,
            text_2_lengths=lengths_2,
        )
        loss = lambda out: loss_fn(out)["total"]
    else:
        clip_loss = ClipLoss()
        inputs = dict(images_1=images[0], text_1=tokens.to(DEVICE), text_1_lengths=lengths)
        loss = lambda out: clip_loss(out["image_features"][0], out["text_features"][0], out["logit_scale"])

    def forward_backward():
        with _autocast():
            total = loss(model(**inputs))
        total.backward()

    return Step(model, optim(model), forward_backward, batch, preset, inputs, loss)


def compile_vision_blocks(model: nn.Module) -> None:
    for block in model.visual.transformer.resblocks:
        block.compile()


# ---- the shares of our step ------------------------------------------------------------------


class _Stub(nn.Module):
    """Stands in for a tower: returns the given outputs, one per call, in turn."""

    batch_independent = False  # one call per view, never a concatenated batch

    def __init__(self, outputs: list):
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, *args, **kwargs):
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return out


@contextlib.contextmanager
def _towers_stubbed(model: nn.Module, image_outputs: list, text_outputs: list):
    visual, text = model.visual, model.text
    model.visual, model.text = _Stub(image_outputs), _Stub(text_outputs)
    try:
        yield
    finally:
        model.visual, model.text = visual, text


def measure_parts(step: Step, case: Case) -> dict[str, float]:
    """Seconds of each part of our step, each timed alone (see the module docstring)."""
    model, inputs = step.model, step.inputs
    images = [inputs[k] for k in ("images_1", "images_2") if k in inputs]
    texts = [inputs[k] for k in ("text_1", "text_2") if k in inputs]
    lengths = [inputs.get(f"{k}_lengths") for k in ("text_1", "text_2") if k in inputs]
    text_kwargs = dict(lengths=lengths, **({"return_tokens": True} if "mlm_targets" in inputs else {}))
    fuse = model.fuse_views
    timed = lambda fn: _median_time(fn, case.rounds, case.part_warmup)

    def run_images():
        return _encode_views(model.visual, images, fuse)

    def run_texts():
        return _encode_views(model.text, texts, fuse, **text_kwargs)

    def outputs(result) -> list[torch.Tensor]:
        """What gets a gradient: every view's features, and view 1's token states (MLM)."""
        if isinstance(result, tuple):
            features, states = result
            return [*features, states[0]]
        return list(result)

    def tower_pass(run) -> Callable[[], None]:
        grads: list[torch.Tensor] = []

        def fn():
            with _autocast():
                outs = outputs(run())
            if not grads:
                gen = torch.Generator().manual_seed(SEED)
                grads.extend(torch.randn(o.shape, generator=gen).to(o) for o in outs)
            torch.autograd.backward(outs, grads)

        return fn

    parts = {
        "image towers": timed(tower_pass(run_images)),
        "text towers": timed(tower_pass(run_texts)),
    }
    with torch.no_grad(), _autocast():
        leaf = lambda t: t.detach().requires_grad_(t.is_floating_point())
        image_out = [leaf(f) for f in run_images()]
        text_out = run_texts()
        if isinstance(text_out, tuple):
            text_out = [(leaf(f), leaf(s)) for f, s in zip(*text_out)]
        else:
            text_out = [leaf(f) for f in text_out]

    def heads_losses():
        with _towers_stubbed(model, image_out, text_out):
            with _autocast():
                total = step.loss(model(**inputs))
            total.backward()

    parts["heads + losses"] = timed(heads_losses)
    parts["optimizer"] = timed(step.optimizer.step)
    parts["data wait"] = 0.0
    return parts


# ---- the benchmark ---------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _process_set_up_as_the_trainer_does() -> None:
    env.setup(DEVICE.type)


_PEAK: list[float] = []


@pytest.fixture
def peak_flops() -> tuple[float, str]:
    """(FLOP/s, what it is) of this device: the best measured so far in this run, measured again
    before each step (on a shared CPU one measurement can land in another process's busy spell;
    the best is the machine's rate)."""
    from benchmarks import peaks

    if ON_GPU:
        if not _PEAK:
            _PEAK.append(peaks.gpu_bf16_matmul_tflops() * 1e12)
        return max(_PEAK), "bf16 matmul peak"
    _PEAK.append(peaks.cpu_fp32_matmul_gflops(n=2048, d=2048) * 1e9)
    return max(_PEAK), "fp32 2048^3 matmul"


@pytest.mark.parametrize("impl", IMPLS)  # the top decorator varies fastest: a case's steps run together
@pytest.mark.parametrize("case", list(CASES))
def test_step(benchmark, report, peak_flops, case, impl):
    step = build_step(case, impl)
    params = sum(p.numel() for p in step.model.parameters())
    if impl == "ours" and (case, "open_clip") in _results:
        # Same architecture: only our <mask> embedding row (text width parameters) more.
        their_params, width = _results[(case, "open_clip")]["params"], step.model.config.text.width
        assert params - their_params == width, f"ours {params:,} vs OpenCLIP {their_params:,} parameters differ"
    flops = count_flops(step.forward_backward, step.model)
    if COMPILE:
        compile_vision_blocks(step.model)

    def timed():
        step()
        _sync()

    benchmark.pedantic(timed, rounds=CASES[case].rounds, iterations=1, warmup_rounds=CASES[case].warmup)
    median = benchmark.stats.stats.median
    parts = measure_parts(step, CASES[case]) if impl != "open_clip" else {}
    peak, _ = peak_flops
    result = dict(
        median_s=median,
        images_per_s=step.batch / median,
        batch=step.batch,
        preset=step.preset,
        params=params,
        dtype=DTYPE,
        compiled_vision_blocks=COMPILE,
        flops_per_step=flops,
        achieved_flops_per_s=flops / median,
        peak_flops_per_s=peak,
        fraction_of_peak=flops / median / peak,
        parts_s=parts,
    )
    theirs = _results.get((case, "open_clip"))
    if impl in ("ours", "ours_padded") and theirs:  # the same CLIP step (DeCLIP's is not)
        result["images_per_s_vs_open_clip"] = result["images_per_s"] / theirs["images_per_s"]
    clip = _results.get((case, "ours"))
    if impl == "declip" and clip:
        result["time_ratio_vs_clip"] = median / clip["median_s"]
        result["flops_ratio_vs_clip"] = flops / clip["flops_per_step"]
        result["flop_s_ratio_vs_clip"] = result["achieved_flops_per_s"] / clip["achieved_flops_per_s"]
    _results[(case, impl)] = result
    benchmark.extra_info.update(result)
    if impl == IMPLS[-1]:
        _report(report, case, peak_flops)


def _report(report, case: str, peak_flops: tuple[float, str]) -> None:
    device = torch.cuda.get_device_name() if ON_GPU else f"CPU, {torch.get_num_threads()} threads"
    where = f"{DTYPE}, {device}" + (", ViT blocks compiled" if COMPILE else "")
    peak, peak_name = peak_flops
    unit, scale = ("TFLOP", 1e12) if ON_GPU else ("GFLOP", 1e9)
    for impl in IMPLS:
        r = _results.get((case, impl))
        if r is None:
            continue
        ratio = r.get("images_per_s_vs_open_clip")
        report(
            f"Training step (forward, loss, backward, AdamW), {where}: declip_fast vs OpenCLIP",
            case=case,
            step=LABELS[impl],
            preset=r["preset"],
            params=f"{r['params']:,}",
            ms_per_step=f"{r['median_s'] * 1e3:.1f}",
            images_per_s=f"{r['images_per_s']:.1f}",
            vs_OpenCLIP=f"{ratio:.2f}x" if ratio else "-",
            **{f"{unit}_per_step": f"{r['flops_per_step'] / scale:.3g}"},
            **{f"{unit}_per_s": f"{r['achieved_flops_per_s'] / scale:.3g}"},
            of_peak=f"{r['achieved_flops_per_s'] / peak:.1%} of {peak / scale:.3g} ({peak_name})",
        )
    for impl in IMPLS[1:]:
        r = _results.get((case, impl))
        if r is None:
            continue
        total = r["median_s"]
        parts = dict(r["parts_s"], rest=total - sum(r["parts_s"].values()))
        cells = {name.replace(" ", "_"): f"{s * 1e3:.1f} ms ({s / total:.0%})" for name, s in parts.items()}
        cells["data_wait"] = "0 (synthetic)"
        report(
            f"Share of our training step by part ({where}; each part timed alone, rest = step - parts)",
            case=case,
            step=LABELS[impl],
            step_ms=f"{total * 1e3:.1f}",
            **cells,
        )
    clip, declip = _results.get((case, "ours")), _results.get((case, "declip"))
    if clip and declip:
        report(
            f"DeCLIP (released) vs CLIP step, ours, packed text ({where})",
            case=case,
            clip_images_per_s=f"{clip['images_per_s']:.1f}",
            declip_images_per_s=f"{declip['images_per_s']:.1f}",
            time_ratio=f"{declip['time_ratio_vs_clip']:.2f}x",
            flops_ratio=f"{declip['flops_ratio_vs_clip']:.2f}x",
            flop_s_ratio=f"{declip['flop_s_ratio_vs_clip']:.2f}x",
        )


# ---- DeCLIP against CLIP, their steps taken in turn -------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_declip_vs_clip_interleaved(benchmark, report, case):
    """Our DeCLIP and CLIP steps taken in turn (CLIP first in even rounds, DeCLIP first in odd
    ones), so that a busy spell of the machine lands on both: the time ratio of the medians and
    the achieved-FLOP/s ratio (FLOPs counted as in ``test_step``). On a shared CPU this is the
    steadier of the two DeCLIP / CLIP measurements; ``test_step`` times each step in its own
    block of rounds."""
    steps = {impl: build_step(case, impl) for impl in ("ours", "declip")}
    flops = {
        impl: _results[(case, impl)]["flops_per_step"]
        if (case, impl) in _results
        else count_flops(s.forward_backward, s.model)
        for impl, s in steps.items()
    }
    if COMPILE:
        for s in steps.values():
            compile_vision_blocks(s.model)
    c = CASES[case]
    rounds = max(c.rounds, 5)
    times: dict[str, list[float]] = {impl: [] for impl in steps}

    def measure():
        for _ in range(c.warmup):
            for s in steps.values():
                s()
        _sync()
        for r in range(rounds):
            for impl in ("ours", "declip") if r % 2 == 0 else ("declip", "ours"):
                start = time.perf_counter()
                steps[impl]()
                _sync()
                times[impl].append(time.perf_counter() - start)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    median = {impl: statistics.median(t) for impl, t in times.items()}
    time_ratio = median["declip"] / median["ours"]
    flops_ratio = flops["declip"] / flops["ours"]
    benchmark.extra_info.update(
        times_s=times,
        median_s=median,
        flops_per_step=flops,
        time_ratio=time_ratio,
        flop_s_ratio=flops_ratio / time_ratio,
    )
    report(
        f"DeCLIP (released) vs CLIP step, ours, steps taken in turn ({DTYPE})",
        case=case,
        rounds=rounds,
        clip_ms=f"{median['ours'] * 1e3:.1f}",
        declip_ms=f"{median['declip'] * 1e3:.1f}",
        time_ratio=f"{time_ratio:.2f}x",
        flops_ratio=f"{flops_ratio:.2f}x",
        flop_s_ratio=f"{flops_ratio / time_ratio:.2f}x",
    )


# ---- the optimizer update alone: torch's default AdamW against the trainer's -------------------


@pytest.mark.parametrize("which", ["torch_default", "trainer"])
def test_optimizer_update(benchmark, report, which):
    """One AdamW update of the paper-size CLIP model's parameters (ViT-B/32 + 12-layer text tower,
    151M, fp32), gradients set: torch's default AdamW (what OpenCLIP's trainer builds) against the
    trainer's ``build_optimizer`` (fused). Before / after for the optimizer's share of the step."""
    if QUICK:
        pytest.skip("BENCH_STEP_QUICK: the paper-size model is left out")
    torch.manual_seed(SEED)
    model = presets.build(PRESETS["vit_b32"][0], device=DEVICE)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    if which == "trainer":
        optimizer = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.1))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    optimizer.step()  # the state is allocated at the first step

    def update():
        optimizer.step()
        _sync()

    benchmark.pedantic(update, rounds=5, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(median_s=median, parameters=sum(p.numel() for p in model.parameters()))
    _OPTIMIZER[which] = median
    if len(_OPTIMIZER) == 2:
        report(
            "AdamW update alone, paper-size CLIP (151M fp32 parameters)",
            torch_default_ms=f"{_OPTIMIZER['torch_default'] * 1e3:.0f}",
            trainer_ms=f"{_OPTIMIZER['trainer'] * 1e3:.0f}",
            trainer_vs_default=f"{_OPTIMIZER['trainer'] / _OPTIMIZER['torch_default']:.2f}x",
        )


_OPTIMIZER: dict[str, float] = {}

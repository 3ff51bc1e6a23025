"""One full training step (forward, the objective, backward, fused AdamW update) of DeCLIP against
CLIP: the paper's ViT-B/32 towers at batch 256 on one GPU, bf16 autocast over fp32 parameters.

GPU: ``declip_vit_b32`` with the ``released`` objective (two image views at 224 px, a masked and an
EDA-like text view, SimSiam, MLM through the fused head, NNS against a full 65,536-row queue)
against ``clip_vit_b32`` with CLIP only (one view of each). CPU: the tiny presets at batch 64 in
fp32, so the code path is exercised in minutes (the CPU ratio at the tiny preset is
benchmarks/bench_objective.py's subject). Captions are random token ids of 20 words with start and
end tokens, view 2 a shifted copy (cost, not content, is measured). Eager mode; images/s and the
DeCLIP / CLIP time ratio are reported (``report.py`` puts the ratio in its peers table).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from declip_fast.data import masking
from declip_fast.losses import DeCLIPLoss
from declip_fast.models import presets
from declip_fast.models.text import EOT_ID, SOT_ID

ON_GPU = torch.cuda.is_available()
BATCH = 256 if ON_GPU else 64
PRESETS = (
    {"clip": "clip_vit_b32", "released": "declip_vit_b32"}
    if ON_GPU
    else {"clip": "clip_tiny", "released": "declip_tiny"}
)
ROUNDS, WARMUP = (10, 3) if ON_GPU else (3, 1)
CAPTION_WORDS = 20
_times: dict[str, float] = {}


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _step_fn(objective: str):
    device = torch.device("cuda" if ON_GPU else "cpu")
    torch.manual_seed(0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    model = presets.build(PRESETS[objective], device=device)
    loss_fn = DeCLIPLoss(objective, embed_dim=model.config.embed_dim, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ON_GPU)
    size, context = model.config.vision.image_size, model.config.text.context_length
    images = [torch.randn(BATCH, 3, size, size, generator=gen).to(device) for _ in range(2)]
    tokens = torch.zeros(BATCH, context, dtype=torch.int64)
    tokens[:, 1 : 1 + CAPTION_WORDS] = torch.randint(0, SOT_ID, (BATCH, CAPTION_WORDS), generator=gen)
    tokens[:, 0], tokens[:, 1 + CAPTION_WORDS] = SOT_ID, EOT_ID
    masked, targets = masking.mask_tokens(tokens, generator=gen)
    text_2 = tokens.clone()
    text_2[:, 1:CAPTION_WORDS] = tokens[:, 2 : 1 + CAPTION_WORDS]  # one word shorter, EOT kept
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=ON_GPU)
    if objective == "clip":
        inputs = dict(images_1=images[0], text_1=tokens.to(device))
    else:
        inputs = dict(
            images_1=images[0],
            images_2=images[1],
            text_1=masked.to(device),
            text_2=text_2.to(device),
            mlm_targets=targets.to(device),
        )

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            losses = loss_fn(model(**inputs))
        losses["total"].backward()
        optimizer.step()
        return losses

    step.loss_fn = loss_fn
    return step


@pytest.mark.parametrize("captions", ["random"])
@pytest.mark.parametrize("objective", ["clip", "released"])
def test_train_step(benchmark, report, objective, captions):
    step = _step_fn(objective)
    if objective != "clip":  # steady state: the lookup scans a full queue
        queue = step.loss_fn.nns.queue
        while len(queue) < queue.size:
            queue.enqueue(F.normalize(torch.randn(4096, queue.dim, device=queue.rows.device), dim=-1))
    for _ in range(WARMUP):
        step()
    _sync()

    def timed():
        step()
        _sync()

    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1)
    median = benchmark.stats.stats.median
    _times[objective] = median
    benchmark.extra_info.update(median_s=median, images_per_s=BATCH / median, batch=BATCH, preset=PRESETS[objective])
    if len(_times) == 2:
        device = torch.cuda.get_device_name() if ON_GPU else "CPU"
        report(
            f"Training step incl. AdamW, batch {BATCH}, {'bf16 autocast' if ON_GPU else 'fp32'}, {device}",
            clip=f"{PRESETS['clip']}: {BATCH / _times['clip']:.0f} img/s",
            declip=f"{PRESETS['released']}: {BATCH / _times['released']:.0f} img/s",
            ratio=f"{_times['released'] / _times['clip']:.2f}x",
        )

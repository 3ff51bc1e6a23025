"""OpenCLIP's own trainer with declip_fast's losses in place of OpenCLIP's.

    python -m declip_fast.integrations.open_clip_train --model ViT-B-32 --train-data ... (any
    argument of ``python -m open_clip_train.main``; torchrun launches it the same way)

replaces OpenCLIP's ``ClipLoss``, ``CoCaLoss``, ``DistillClipLoss`` and ``SigLipLoss`` with the
drop-ins of ``declip_fast.losses`` wherever OpenCLIP and its trainer look them up (``open_clip``,
``open_clip.loss``, and ``open_clip.factory``, whose ``create_loss`` builds the trainer's loss),
then runs ``open_clip_train.main.main(argv)`` unchanged: same arguments, same logs and
checkpoints, same loss values, without the N x N logits. A class ``declip_fast.losses`` does not
have (SigLipLoss, in a version without it) stays OpenCLIP's, with a warning.

Needs ``open-clip-torch[training]``. Importing this module imports neither OpenCLIP nor torch.
"""

from __future__ import annotations

import importlib
import sys
import warnings

# OpenCLIP's loss classes we have drop-ins for, by name in open_clip.loss and declip_fast.losses.
LOSSES = ("ClipLoss", "CoCaLoss", "DistillClipLoss", "SigLipLoss")
# Where OpenCLIP binds them: create_loss reads open_clip.factory's globals when it runs.
HOSTS = ("open_clip.loss", "open_clip.factory", "open_clip")


def our_losses() -> dict[str, type]:
    """``{name: our class}`` for each of ``LOSSES`` that ``declip_fast.losses`` has; a warning for
    each it lacks."""
    found = {}
    for name in LOSSES:
        try:
            found[name] = getattr(importlib.import_module("declip_fast.losses"), name)
        except (ImportError, AttributeError) as e:
            warnings.warn(f"declip_fast.losses has no {name} ({e}); OpenCLIP's stays in use", stacklevel=2)
    return found


def install() -> list[tuple[object, str, type]]:
    """Swap our losses in (see the module docstring); returns the ``(module, name, OpenCLIP's
    class)`` it replaced, for :func:`uninstall`. Every loaded ``open_clip`` / ``open_clip_train``
    module that binds one of OpenCLIP's classes under its name gets ours."""
    import open_clip.loss as theirs

    for host in HOSTS:
        importlib.import_module(host)
    replaced = []
    for name, ours in our_losses().items():
        original = getattr(theirs, name, None)
        if original is None:
            continue
        for module_name, module in list(sys.modules.items()):
            if module_name.split(".")[0] not in ("open_clip", "open_clip_train"):
                continue
            if getattr(module, name, None) is original:
                setattr(module, name, ours)
                replaced.append((module, name, original))
    return replaced


def uninstall(replaced: list[tuple[object, str, type]]) -> None:
    """Put OpenCLIP's classes back where :func:`install` replaced them."""
    for module, name, original in reversed(replaced):
        setattr(module, name, original)


def main(argv: list[str] | None = None):
    """``open_clip_train.main.main(argv)`` (default: the command line) with our losses."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        train_main = importlib.import_module("open_clip_train.main")
    except ImportError as e:
        raise SystemExit(f"open_clip_train is not installed ({e}): pip install 'open-clip-torch[training]'") from e
    replaced = install()
    names = sorted({name for _, name, _ in replaced})
    print(f"declip_fast.integrations.open_clip_train: declip_fast.losses {', '.join(names)}", file=sys.stderr)
    return train_main.main(argv)


if __name__ == "__main__":
    main()

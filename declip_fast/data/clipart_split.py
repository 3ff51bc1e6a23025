"""The clip-art data set's classes and splits (used by :mod:`declip_fast.data.clipart`).

Classes are category folders of the package that hold one kind of thing (``CLASS_FOLDERS``,
longest prefix wins; a folder mapped to None has no class); those with at least ``min_size``
rendered images are the zero-shot classes, named as a prompt needs them ("musical instrument",
"piece of clothing"), sorted by name.

Splits are drawn by caption group, so that near-duplicates (one title, several drawings) never
straddle train and test. A group's class is its members' most common one. Per class, groups are
taken in the order of SHA-256(seed, group) until about ``zeroshot_fraction`` of its images are held
out (at least one group; at least one stays in train when it has two); then, from the other
groups, about ``retrieval_fraction`` of all pairs are held out for retrieval. Members of a
zero-shot group without a class are held out too, in neither test (split None).
"""

from __future__ import annotations

import collections
import hashlib

CLASS_FOLDERS = {
    "signs_and_symbols/flags": "flag",
    "people": "person",
    "people/stickmen": "person",
    "people/bodypart": None,
    "people/smilies": None,
    "people/clothing": "piece of clothing",
    "animals/mammals": "mammal",
    "animals/birds": "bird",
    "animals/bugs": "insect",
    "animals/fish": "fish",
    "food/fruit": "fruit",
    "food/desserts": "dessert",
    "food/beverages": "drink",
    "food/vegetables": "vegetable",
    "recreation/music": "musical instrument",
    "recreation/games/cards": "playing card",
    "recreation/sports": "sports equipment",
    "tools": "tool",
    "tools/weapons": "weapon",
    "transportation/vehicles": "vehicle",
    "transportation/boating": "vehicle",
    "transportation/roadsigns": "road sign",
    "plants": "plant",
    "buildings": "building",
    "buildings/furniture": "piece of furniture",
    "computer/buttons": "button",
    "computer/hardware": "computer hardware",
    "special/patterns": "pattern",
    "geography": "map",
    "geography/astronomy": None,
    "signs_and_symbols/clocks": "clock",
    "signs_and_symbols/weather": "weather symbol",
}


def folder_class(path: str) -> str | None:
    """The class of a file (relative path) by the longest matching ``CLASS_FOLDERS`` prefix."""
    parts = path.split("/")[:-1]
    for n in range(len(parts), 0, -1):
        prefix = "/".join(parts[:n])
        if prefix in CLASS_FOLDERS:
            return CLASS_FOLDERS[prefix]
    return None


def assign_classes(paths: list[str], min_size: int) -> tuple[list[str], list[int]]:
    """(class names with ``min_size``+ files, sorted; each file's label, -1 for none)."""
    names = [folder_class(p) for p in paths]
    counts = collections.Counter(n for n in names if n is not None)
    classes = sorted(n for n, k in counts.items() if k >= min_size)
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index.get(n, -1) if n is not None else -1 for n in names]


def _order(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}\0{group}".encode()).hexdigest()


def split_groups(
    groups: list[str], labels: list[int], seed: int, zeroshot_fraction: float, retrieval_fraction: float
) -> list[str | None]:
    """Per pair: "train", "test" (zero-shot), "retrieval" or None (held out, unlabelled)."""
    members: dict[str, list[int]] = collections.defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    order = sorted(members, key=lambda g: (_order(seed, g), g))
    group_label = {}
    for group in order:
        votes = collections.Counter(labels[i] for i in members[group] if labels[i] >= 0)
        group_label[group] = min(votes, key=lambda c: (-votes[c], c)) if votes else -1
    held: dict[str, str] = {}
    for label in sorted({x for x in labels if x >= 0}):
        candidates = [g for g in order if group_label[g] == label]
        target = max(1, round(zeroshot_fraction * sum(x == label for x in labels)))
        taken = 0
        for k, group in enumerate(candidates):
            if taken >= target or (k > 0 and k == len(candidates) - 1):
                break
            held[group] = "test"
            taken += sum(labels[i] == label for i in members[group])
    target, taken = round(retrieval_fraction * len(groups)), 0
    for group in order:
        if taken >= target:
            break
        if group not in held:
            held[group] = "retrieval"
            taken += len(members[group])
    split: list[str | None] = []
    for group, label in zip(groups, labels):
        part = held.get(group, "train")
        split.append(None if part == "test" and label < 0 else part)
    return split

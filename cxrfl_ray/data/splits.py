"""Patient-level train/val/test assignment that does not depend on row order.

A patient's split is a pure function of (seed, patient_id), so adding or removing other
images never moves a patient between splits, and no patient straddles two splits.
"""

from __future__ import annotations

import hashlib


def patient_split(patient_id: str, seed: int, val_frac: float, test_frac: float) -> str:
    """``train``/``val``/``test`` for a patient, from a seeded hash of its id."""
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(
            f"val_frac={val_frac} and test_frac={test_frac} must be in [0, 1) and sum below 1"
        )
    digest = hashlib.blake2b(f"{seed}:{patient_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < test_frac:
        return "test"
    if u < test_frac + val_frac:
        return "val"
    return "train"


SPLIT_ALIASES = {
    "train": "train", "training": "train", "tr": "train", "1": "train", "true": "train", "yes": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "ts": "test", "0": "test", "false": "test", "no": "test",
}


def normalise_split(value: str) -> str | None:
    """Map common spellings (``valid``, ``Training``, CXR-FL's ``train`` flag 1/0) to a split."""
    return SPLIT_ALIASES.get(str(value).strip().lower())

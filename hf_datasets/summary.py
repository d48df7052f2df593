"""A short text summary of a dataset: rows, patients, duplicates, prevalence, exclusions."""

from __future__ import annotations

from datasets import DatasetDict

from hf_datasets.labels import OBSERVATIONS, POSITIVE


def split_counts(dataset: DatasetDict) -> dict[str, dict[str, int]]:
    """Rows, patients, studies and duplicated rows per split."""
    counts = {}
    for split, part in dataset.items():
        copies = part["copies"]
        counts[split] = {
            "rows": len(part),
            "patients": len(set(part["patient_id"])),
            "studies": len(set(part["study_id"])),
            "duplicated_images": len(
                {p for p, c in zip(part["source_path"], copies, strict=True) if c > 1}
            ),
            "duplicate_rows": sum(1 for c in copies if c > 1),
        }
    return counts


def prevalence(dataset: DatasetDict, split: str = "train") -> dict[str, float]:
    """Share of rows positive for each observation in one split."""
    part = dataset[split]
    n = max(1, len(part))
    return {name: sum(1 for v in part[name] if v == POSITIVE) / n for name in OBSERVATIONS}


def labelled(dataset: DatasetDict, split: str = "train") -> list[str]:
    """The observations that have a label (1, 0 or -1) in at least one row of the split."""
    part = dataset[split]
    return [name for name in OBSERVATIONS if any(v is not None for v in part[name])]


def most_common(dataset: DatasetDict, split: str, top: int = 5) -> str:
    """'most common in train: A 40%, ...', or what is missing when no label is positive."""
    present = labelled(dataset, split)
    if not present:
        return f"no CheXpert labels in {split}"
    shares = prevalence(dataset, split)
    ranked = sorted(((k, shares[k]) for k in present if shares[k] > 0), key=lambda kv: -kv[1])
    if not ranked:
        return f"no positive CheXpert labels in {split} (labelled: {', '.join(present)})"
    return f"most common in {split}: " + ", ".join(f"{k} {v:.0%}" for k, v in ranked[:top])


def summarize(dataset: DatasetDict) -> str:
    """Human-readable lines: one per split, the most common findings, what was left out."""
    lines = []
    for split, c in split_counts(dataset).items():
        dup = (
            f", {c['duplicated_images']} images repeated in {c['duplicate_rows']} rows"
            if c["duplicate_rows"]
            else ""
        )
        lines.append(
            f"{split:>10}: {c['rows']} rows, {c['patients']} patients, {c['studies']} studies{dup}"
        )
    first = "train" if "train" in dataset else next(iter(dataset), None)
    if first is not None and len(dataset[first]):
        lines.append(most_common(dataset, first))
        description = dataset[first].info.description or ""
        lines += [
            line for line in description.splitlines() if "left out" in line or "Duplicates" in line
        ]
    return "\n".join(lines)

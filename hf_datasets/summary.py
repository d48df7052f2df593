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
        top = sorted(prevalence(dataset, first).items(), key=lambda kv: -kv[1])[:5]
        lines.append(f"most common in {first}: " + ", ".join(f"{k} {v:.0%}" for k, v in top))
        description = dataset[first].info.description or ""
        lines += [
            line for line in description.splitlines() if "left out" in line or "Duplicates" in line
        ]
    return "\n".join(lines)

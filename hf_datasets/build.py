"""Turn a list of rows (with image paths) into a `DatasetDict`, counting every row left out."""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from datasets import Dataset, DatasetDict

from hf_datasets import images
from hf_datasets.errors import ChexmemError
from hf_datasets.features import FEATURES, SPLITS
from hf_datasets.images import check_images, load_for_dataset
from hf_datasets.labels import UncertaintyPolicy
from hf_datasets.prompts import PromptConfig
from hf_datasets.splits import check_fractions, split_patients

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SourceOptions:
    """Options every file-based source shares; CLI flags use the same names."""

    uncertainty: str = "keep"
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1)
    seed: int = 0
    resolution: int | None = None
    max_rows: int | None = None
    verify_images: bool = True
    strict: bool = False
    num_workers: int = 1
    prompts: PromptConfig = field(default_factory=PromptConfig)

    def policy(self) -> UncertaintyPolicy:
        """The uncertainty policy, with a clear error for an unknown name."""
        try:
            return UncertaintyPolicy(self.uncertainty)
        except ValueError:
            choices = ", ".join(p.value for p in UncertaintyPolicy)
            raise ChexmemError(
                f"uncertainty policy must be one of {choices}, not {self.uncertainty!r}"
            ) from None


@dataclass
class Exclusions:
    """Why rows were left out, with counts and a few example paths per reason."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, example: str = "", n: int = 1) -> None:
        """Count `n` rows left out for `reason`."""
        if n <= 0:
            return
        self.counts[reason] += n
        if example and len(self.examples.setdefault(reason, [])) < 3:
            self.examples[reason].append(example)

    def describe(self) -> str:
        """One line per reason, e.g. '3 rows left out: missing image'."""
        if not self.counts:
            return "No rows were left out."
        return "\n".join(
            f"{n} row(s) left out: {reason}" for reason, n in sorted(self.counts.items())
        )


def filter_images(
    rows: list[dict[str, Any]],
    exclusions: Exclusions,
    *,
    verify: bool,
    strict: bool,
    num_workers: int,
) -> list[dict[str, Any]]:
    """Rows whose image exists (and decodes, if `verify`); the others are counted and logged."""
    problems = check_images([r["image"] for r in rows], decode=verify, num_workers=num_workers)
    bad = [(row, reason) for row, reason in zip(rows, problems, strict=True) if reason is not None]
    if bad and strict:
        row, reason = bad[0]
        raise ChexmemError(
            f"{len(bad)} image(s) cannot be used (first: {row['image']}: {reason}); "
            "fix them or drop --strict to skip them with a warning"
        )
    for row, reason in bad:
        exclusions.add(f"{reason.split(':')[0]} image", row["image"])
    if bad:
        shown = ", ".join(f"{r['image']} ({why})" for r, why in bad[:3])
        logger.warning("skipping %d image(s) that cannot be read, e.g. %s", len(bad), shown)
    return [row for row, reason in zip(rows, problems, strict=True) if reason is None]


def source_fingerprint(*modules: ModuleType) -> str:
    """Hash of the modules' source, passed to generators so a code change invalidates the cache.

    `Dataset.from_generator` caches by the generator and its arguments only, not by the code
    of the functions it calls.
    """
    digest = hashlib.sha256()
    for module in modules:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


def _generate(
    rows: list[dict[str, Any]], resolution: int | None, code: str
) -> Iterator[dict[str, Any]]:
    """Yield rows with the image column ready for the `Image()` feature."""
    for row in rows:
        yield {**row, "image": load_for_dataset(row["image"], resolution)}


def rows_to_dataset(rows: list[dict[str, Any]], resolution: int | None, split: str) -> Dataset:
    """A `Dataset` in the shared schema, written to the datasets cache as it is generated."""
    if not rows:
        return Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES, split=split)
    return Dataset.from_generator(
        _generate,
        gen_kwargs={"rows": rows, "resolution": resolution, "code": source_fingerprint(images)},
        features=FEATURES,
        split=split,
    )


def build_dataset_dict(
    rows_by_split: Mapping[str, Sequence[dict[str, Any]]],
    *,
    resolution: int | None,
    description: str,
    exclusions: Exclusions,
) -> DatasetDict:
    """The `DatasetDict` of the given splits; the description records what was left out."""
    text = f"{description}\n{exclusions.describe()}"
    splits = {}
    for split in SPLITS:
        if split not in rows_by_split:
            continue
        dataset = rows_to_dataset(list(rows_by_split[split]), resolution, split)
        dataset.info.description = text
        splits[split] = dataset
    for reason, n in sorted(exclusions.counts.items()):
        logger.info("%d row(s) left out: %s", n, reason)
    return DatasetDict(splits)


def split_by_patient(
    rows: list[dict[str, Any]], fractions: Sequence[float], seed: int
) -> dict[str, list[dict[str, Any]]]:
    """Rows per split, every patient's rows in one split."""
    assignment = split_patients([r["patient_id"] for r in rows], fractions, seed)
    by_split: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for row in rows:
        by_split[assignment[row["patient_id"]]].append(row)
    return by_split


Splitter = Callable[[list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]


def no_rows_message(exclusions: Exclusions) -> str:
    """Why no row is left: the reasons on one line, with an example path where there is one."""
    if not exclusions.counts:
        return "the source lists no rows, so there is nothing to build a dataset from"
    reasons = "; ".join(exclusions.describe().splitlines())
    examples = "; ".join(f"{k}: {v[0]}" for k, v in exclusions.examples.items() if v)
    return f"no usable rows left ({reasons})" + (f"; e.g. {examples}" if examples else "")


def assemble(
    rows: list[dict[str, Any]],
    options: SourceOptions,
    *,
    exclusions: Exclusions,
    description: str,
    splitter: Splitter | None = None,
) -> DatasetDict:
    """Limit, check images, split by patient and build: the common tail of every source."""
    fractions = check_fractions(options.split_fractions)
    if options.max_rows is not None and len(rows) > options.max_rows:
        exclusions.add(f"beyond max_rows={options.max_rows}", n=len(rows) - options.max_rows)
        rows = rows[: options.max_rows]
    rows = filter_images(
        rows,
        exclusions,
        verify=options.verify_images,
        strict=options.strict,
        num_workers=options.num_workers,
    )
    if not rows:
        raise ChexmemError(no_rows_message(exclusions))
    if splitter is None:
        rows_by_split = split_by_patient(rows, fractions, options.seed)
    else:
        rows_by_split = splitter(rows)
    description += (
        f" Split fractions {list(fractions)} by patient, seed {options.seed}; "
        f"resolution {options.resolution}; uncertainty policy {options.uncertainty}; "
        f"prompt style {options.prompts.style}."
    )
    return build_dataset_dict(
        rows_by_split,
        resolution=options.resolution,
        description=description,
        exclusions=exclusions,
    )

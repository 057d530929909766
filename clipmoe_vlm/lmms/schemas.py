"""The ``datasets`` feature types of the three benchmark tables, in the ``lmms-lab`` hub layouts.

One definition for both producers (the official-format converters in `clipmoe_vlm.lmms.prepare` and the Shapes
world's writers), so a converted file and a generated one always load the same way upstream. Column order is part
of the schema: it is the order of the parquet columns. ``datasets`` is imported on call, as this package promises
to stay light on import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["mmbench_features", "mmvet_features", "vizwiz_features"]


def mmbench_features(options: Sequence[str] = "ABCD") -> Any:
    """MMBench-EN dev: ``index`` is int64 (the upstream aggregation compares it with ``1e6``); ``options`` names
    the option columns (``"ABCDE"`` when a source has an E column)."""
    import datasets

    string = datasets.Value("string")
    columns: dict[str, Any] = {"index": datasets.Value("int64"), "question": string, "hint": string}
    columns.update({letter: string for letter in options})
    columns.update(
        {
            "answer": string,
            "category": string,
            "image": datasets.Image(),
            "source": string,
            "L2-category": string,
            "comment": string,
            "split": string,
        }
    )
    return datasets.Features(columns)


def mmvet_features() -> Any:
    """MM-Vet: answers joined with ``<AND>``/``<OR>``, ``capability`` comma-joined."""
    import datasets

    string = datasets.Value("string")
    return datasets.Features(
        {
            "question_id": string,
            "image": datasets.Image(),
            "question": string,
            "answer": string,
            "image_source": string,
            "capability": string,
        }
    )


def vizwiz_features() -> Any:
    """VizWiz-VQA val: ten annotator ``answers`` per question."""
    import datasets

    string = datasets.Value("string")
    return datasets.Features(
        {
            "question_id": string,
            "image": datasets.Image(),
            "question": string,
            "answers": datasets.List(string),
            "category": string,
        }
    )

"""Bad inputs of the lmms-eval integration, without a model: hub parquet shards, MMBench columns and index,
images that do not decode, judge replies, and the wrapper's exit status (lmms-eval replaced by a stub that writes
what a run would write).

Every check asserts the exact count or the named file / row / column of the error.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
from PIL import Image

pytest.importorskip("lmms_eval")

from clipmoe_vlm.lmms import runner
from conftest import ChatJudge, serve_judge
from clipmoe_vlm.lmms.errors import EvalSetupError
from clipmoe_vlm.lmms.judge import parse_judge_score
from clipmoe_vlm.lmms.prepare import (
    check_parquet,
    from_parquet_shards,
    mmbench_from_tsv,
    mmvet_from_folder,
    vizwiz_from_json,
)
from clipmoe_vlm.lmms.prepare import main as prepare_main

NOT_AN_IMAGE = b"this is not an image"


def _png(color=(10, 120, 200), size=(20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _truncated_png() -> bytes:
    return _png(size=(64, 64))[:-40]  # header intact: opens, fails while decoding


# --------------------------------------------------------------------------- hub parquet shards
def _vizwiz_shard(path: Path, first: int, n: int, bad_row: int | None = None, drop: str | None = None) -> Path:
    import datasets

    from clipmoe_vlm.lmms.schemas import vizwiz_features

    rows = [{"question_id": f"VizWiz_val_{first + k:08d}.jpg",
             "image": {"bytes": NOT_AN_IMAGE if k == bad_row else _png((k * 40, 10, 10)), "path": None},
             "question": f"question {first + k}?", "answers": ["yes"] * 10, "category": "yes/no"} for k in range(n)]
    table = datasets.Dataset.from_list(rows, features=vizwiz_features())
    if drop:
        table = table.remove_columns(drop)
    table.to_parquet(str(path))
    return path


def test_vizwiz_shards_merge_into_one_file(tmp_path):
    import datasets

    shards = tmp_path / "hub"
    shards.mkdir()
    sizes = (3, 2, 4)
    first = 0
    for k, size in enumerate(sizes):  # the hub's naming; sorted by name = shard order
        _vizwiz_shard(shards / f"validation-{k:05d}-of-{len(sizes):05d}.parquet", first, size)
        first += size
    out = tmp_path / "data"
    assert prepare_main(["--out_dir", str(out), "vizwiz", "--parquet", str(shards)]) == 0
    merged = out / "vizwiz_vqa_val.parquet"
    check_parquet(merged, "vizwiz_vqa_val")
    loaded = datasets.load_dataset("parquet", data_files={"val": str(merged)})["val"]
    assert len(loaded) == sum(sizes) == 9
    assert loaded["question_id"] == [f"VizWiz_val_{k:08d}.jpg" for k in range(9)]
    assert isinstance(loaded[4]["image"], Image.Image) and loaded[4]["image"].size == (20, 12)
    # files named one by one, in the order given
    files = sorted(shards.glob("*.parquet"))
    prepare_main(["--out_dir", str(tmp_path / "two"), "vizwiz", "--parquet", str(files[2]), str(files[0])])
    again = datasets.load_dataset("parquet", data_files={"val": str(tmp_path / "two" / "vizwiz_vqa_val.parquet")})
    assert len(again["val"]) == 4 + 3 and again["val"]["question_id"][0] == "VizWiz_val_00000005.jpg"
    # the task reads one file: a folder is refused with the command that merges it
    with pytest.raises(EvalSetupError, match=r"is a folder; the task reads one parquet file.*--parquet"):
        check_parquet(shards, "vizwiz_vqa_val")


def test_shard_without_a_column_is_named(tmp_path):
    good = _vizwiz_shard(tmp_path / "a.parquet", 0, 2)
    bad = _vizwiz_shard(tmp_path / "b.parquet", 2, 2, drop="answers")
    out = tmp_path / "out" / "vizwiz_vqa_val.parquet"
    with pytest.raises(EvalSetupError) as error:
        from_parquet_shards([good, bad], "vizwiz_vqa_val", out)
    assert str(error.value).startswith(f"{bad}: missing column(s) answers needed by vizwiz_vqa_val (has: category, "
                                       "image, question, question_id); is it a shard of the vizwiz_vqa_val dataset?")
    assert not out.exists() and not list(out.parent.glob("*.partial"))
    # a column of the wrong type names the shard and the column
    import pyarrow.parquet as pq

    table = pq.read_table(str(good))
    wrong = tmp_path / "c.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("answers"), "answers",
                                    _strings(["yes", "no"])), str(wrong))
    with pytest.raises(EvalSetupError, match=rf"^{wrong}: column answers has type string, expected list<item: "
                                             r"string>"):
        from_parquet_shards([good, wrong], "vizwiz_vqa_val", out)
    assert not out.exists()


def _strings(values):
    import pyarrow as pa

    return pa.array(values, pa.string())


def test_shard_with_a_bad_image_names_shard_and_row(tmp_path):
    good = _vizwiz_shard(tmp_path / "a.parquet", 0, 3)
    bad = _vizwiz_shard(tmp_path / "b.parquet", 3, 3, bad_row=1)
    out = tmp_path / "out" / "vizwiz_vqa_val.parquet"
    with pytest.raises(EvalSetupError) as error:
        from_parquet_shards([good, bad], "vizwiz_vqa_val", out)
    message = str(error.value)
    assert message.startswith(
        f"{bad}: row 1 (0-based; doc_id 4 of the merged file, question_id='VizWiz_val_00000004.jpg')")
    assert "column image: image does not decode (UnidentifiedImageError" in message
    assert not out.exists()


def _mmbench_shard(path: Path, index: list, drop: tuple[str, ...] = ()) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(index)
    columns = {"index": index, "question": ["q?"] * n, "hint": [None] * n, "A": ["yes"] * n, "B": ["no"] * n,
               "C": [None] * n, "D": [None] * n, "answer": ["A"] * n, "category": ["c"] * n,
               "image": [{"bytes": _png(), "path": None}] * n, "source": ["s"] * n, "L2-category": ["l2"] * n,
               "comment": [None] * n, "split": ["dev"] * n}
    for name in drop:
        columns.pop(name)
    pq.write_table(pa.table(columns), str(path))
    return path


def test_mmbench_parquet_needs_source_split_and_integer_index(tmp_path):
    import datasets

    out = tmp_path / "mmbench_en_dev.parquet"
    no_source = _mmbench_shard(tmp_path / "no_source.parquet", [0, 1], drop=("source", "split"))
    with pytest.raises(EvalSetupError, match=rf"^{no_source}: missing column\(s\) source, split needed by mmbench"):
        from_parquet_shards([no_source], "mmbench_en_dev", out)
    # a string index holding integers is converted; one that is not an integer names its row
    digits = _mmbench_shard(tmp_path / "digits.parquet", ["0", "1"])
    words = _mmbench_shard(tmp_path / "words.parquet", ["2", "three", "4"])
    with pytest.raises(EvalSetupError) as error:
        from_parquet_shards([digits, words], "mmbench_en_dev", out)
    assert str(error.value).startswith(f"{words}: row 1 (0-based; doc_id 3 of the merged file, index='three'): "
                                       "column index is 'three' (type string), not an integer")
    from_parquet_shards([digits], "mmbench_en_dev", out)
    loaded = datasets.load_dataset("parquet", data_files={"dev": str(out)})["dev"]
    assert loaded["index"] == [0, 1] and loaded.features["index"].dtype == "int64"
    # the pre-launch check reads the schema only: a string index is refused before any generation
    with pytest.raises(EvalSetupError, match=rf"^{digits}: column index has type string, not an integer"):
        check_parquet(digits, "mmbench_en_dev")


def test_mmbench_task_load_refuses_a_string_index():
    import datasets

    from clipmoe_vlm.lmms.prepare import REQUIRED_COLUMNS
    from clipmoe_vlm.lmms.tasks import mmbench_process_docs

    columns = list(REQUIRED_COLUMNS["mmbench_en_dev"])
    docs = SimpleNamespace(column_names=columns, cache_files=[{"filename": "/d/mmbench_en_dev.parquet"}],
                           features=datasets.Features({"index": datasets.Value("string")}))
    with pytest.raises(EvalSetupError, match=r"mmbench_en_dev_local data \(/d/mmbench_en_dev.parquet\): column "
                                             r"index has type string, not an integer"):
        mmbench_process_docs(docs)
    docs.features = datasets.Features({"index": datasets.Value("int64")})
    assert mmbench_process_docs(docs) is docs
    docs.column_names = [c for c in columns if c not in ("source", "split")]
    with pytest.raises(EvalSetupError, match=r"missing column\(s\) source, split needed by mmbench_en_dev"):
        mmbench_process_docs(docs)


def test_mmbench_tsv_errors_name_the_row(tmp_path):
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\tsource\tl2-category\tcomment\tsplit"
    good = base64.b64encode(_png()).decode()

    def tsv(name: str, cells: list[tuple[str, str]], head: str = header) -> Path:
        path = tmp_path / name
        lines = [head] + [f"{index}\tq?\t\tyes\tno\t\t\tA\tc\t{image}\ts\tl2\t\tdev" for index, image in cells]
        path.write_text("\n".join(lines) + "\n")
        return path

    out = tmp_path / "out.parquet"
    no_split = tsv("no_split.tsv", [("0", good)], head=header.replace("\tsplit", "\tsplit_x"))
    with pytest.raises(EvalSetupError, match=r"missing column\(s\) split needed by mmbench_en_dev"):
        mmbench_from_tsv(no_split, out)
    path = tsv("index.tsv", [("0", good), ("1", good), ("x7", good)])
    with pytest.raises(EvalSetupError, match=rf"^{path}: data row 3: column index is 'x7', not an integer"):
        mmbench_from_tsv(path, out)
    bad64 = "A" * 65 + "="  # valid alphabet, wrong padding: binascii.Error before this check
    path = tsv("base64.tsv", [("0", good), ("1", bad64)])
    with pytest.raises(EvalSetupError, match=rf"^{path}: data row 2 \(index=1\): column image is not valid base64"):
        mmbench_from_tsv(path, out)
    not_image = base64.b64encode(NOT_AN_IMAGE * 5).decode()
    path = tsv("image.tsv", [("0", good), ("1", good), ("2", not_image)])
    with pytest.raises(EvalSetupError, match=rf"^{path}: data row 3 \(index=2\), column image: image does not "
                                             r"decode \(UnidentifiedImageError"):
        mmbench_from_tsv(path, out)
    assert not out.exists()


def test_mmvet_and_vizwiz_images_are_decoded(tmp_path):
    folder = tmp_path / "mm-vet"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "v1_0.png").write_bytes(_png())
    (folder / "images" / "v1_1.png").write_bytes(_truncated_png())
    items = {f"v1_{k}": {"imagename": f"v1_{k}.png", "capability": ["rec"], "question": "q?", "answer": "a"}
             for k in range(2)}
    (folder / "mm-vet.json").write_text(json.dumps(items))
    with pytest.raises(EvalSetupError, match=r"mm-vet.json \[v1_1\]: .*v1_1.png: image does not decode \(OSError"):
        mmvet_from_folder(folder, tmp_path / "mmvet.parquet")

    images = tmp_path / "val"
    images.mkdir()
    records = []
    for k, data in enumerate([_png(), _png(), NOT_AN_IMAGE]):
        (images / f"VizWiz_val_{k}.jpg").write_bytes(data)
        records.append({"image": f"VizWiz_val_{k}.jpg", "question": "q?", "answers": [{"answer": "yes"}]})
    (tmp_path / "val.json").write_text(json.dumps(records))
    with pytest.raises(EvalSetupError, match=r"val.json \[2\] \(VizWiz_val_2.jpg\): image does not decode"):
        vizwiz_from_json(tmp_path / "val.json", images, tmp_path / "vizwiz.parquet")


# --------------------------------------------------------------------------- judge replies
def _upstream_reads(reply: str) -> float | None:
    """What lmms_eval/tasks/mmvet/utils.py accepts: first space-separated token as a float, in [0, 1]."""
    try:
        score = float(reply.strip().split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


JUDGE_REPLIES = [  # reply, score (None: not a score; retried, then counted as unjudged)
    ("0.5", 0.5), ("1.0", 1.0), ("0", 0.0), ("1", 1.0), (".3", 0.3), ("01", 1.0), ("0.70", 0.7), ("1e-1", 0.1),
    ("  0.4  ", 0.4), ("1.0 because the prediction matches", 1.0), ("10", None), ("2", None), ("-0.1", None),
    ("1.01", None), ("0,5", None), ("0.5.", None), ("nan", None), ("inf", None), ("n/a", None), ("", None),
    ("Score: 0.5", None), ("0.5\nbecause", 0.5),
]


def test_judge_reply_parse_table():
    assert [parse_judge_score(reply) for reply, _ in JUDGE_REPLIES] == [score for _, score in JUDGE_REPLIES]
    # identical to upstream for every reply without a newline (upstream splits on " " only)
    for reply, _ in JUDGE_REPLIES:
        if "\n" not in reply:
            assert parse_judge_score(reply) == _upstream_reads(reply), reply


class _Judge(ChatJudge):
    """MM-Vet judge that answers "10" (out of range) to questions starting with "garbled", "0.6" otherwise; records
    the temperature of each grading call."""

    temperatures: ClassVar[list[float]] = []

    def reply(self, prompt: str, body: dict) -> str:
        if "Correctness" in prompt:
            self.temperatures.append(body.get("temperature"))
        return "10" if prompt.strip().splitlines()[-1].startswith("garbled") else "0.6"


@pytest.fixture
def judge_url():
    with serve_judge(_Judge()) as url:
        yield url


def test_unparseable_judge_reply_is_counted(monkeypatch, judge_url):
    from clipmoe_vlm.lmms.tasks import mmvet_process_results, mmvet_unjudged_count

    monkeypatch.setenv("CLIPMOE_JUDGE_BASE_URL", judge_url)
    monkeypatch.delenv("CLIPMOE_JUDGE_API_KEY", raising=False)
    doc = {"question_id": "v1_9", "question": "garbled question?", "answer": "yes", "capability": "rec"}
    _Judge.temperatures.clear()
    garbled = mmvet_process_results(doc, ["yes"])
    assert garbled["unjudged"] == 1 and garbled["gpt_eval_score"]["score"] == 0.0
    assert _Judge.temperatures == [0.0, 0.5, 1.0]  # asked three times, as upstream ramps the temperature
    judged = mmvet_process_results({**doc, "question": "plain question?"}, ["yes"])
    assert judged["unjudged"] == 0 and judged["gpt_eval_score"]["score"] == 0.6
    assert mmvet_unjudged_count([0, 1, 0, 1, 1]) == 3


# --------------------------------------------------------------------------- wrapper exit status
def _fake_lmms_eval(monkeypatch, *, unjudged: int = 0, n_mmvet: int = 20, skipped: list[tuple[str, int]] = ()):
    """Replace the lmms-eval launch by a stub that writes a results file (and the model's skipped-document
    reports, split over two ranks) into the --output_path of the command."""
    seen = {}

    def launch(command, env):
        seen["command"] = command
        output = Path(command[command.index("--output_path") + 1])
        model_args = dict(part.split("=", 1) for part in command[command.index("--model_args") + 1].split(","))
        seen["model_args"] = model_args
        (output / "model").mkdir(parents=True, exist_ok=True)
        results = {"results": {"mmvet_local": {"gpt_eval_score,none": 41.0, "unjudged,none": unjudged},
                               "vizwiz_vqa_val_local": {"exact_match,none": 0.5}},
                   "n-samples": {"mmvet_local": {"effective": n_mmvet}, "vizwiz_vqa_val_local": {"effective": 8}}}
        (output / "model" / "20260101_results.json").write_text(json.dumps(results))
        for rank in (0, 1):
            documents = [{"task": task, "split": "val", "doc_id": doc_id, "error": "UnidentifiedImageError: x"}
                         for task, doc_id in skipped if doc_id % 2 == rank]
            report = {"rank": rank, "world_size": 2, "skipped": len(documents), "documents": documents}
            (Path(model_args["skipped_report"]) / f"clipmoe_skipped.rank{rank}.json").write_text(json.dumps(report))
        return 0

    monkeypatch.setattr(runner, "_launch", launch)
    return seen


def _run(tmp_path: Path, *flags: str) -> tuple[int, dict]:
    summary = tmp_path / "summary.json"
    code = runner.main([str(tmp_path / "model"), "--no_preflight", "--tasks", "mmvet_local,vizwiz_vqa_val_local",
                        "--output_path", str(tmp_path / "out"), "--summary_json", str(summary), *flags])
    return code, json.loads(summary.read_text())


def test_wrapper_clean_run_defaults(tmp_path, monkeypatch, capsys):
    seen = _fake_lmms_eval(monkeypatch)
    stale = tmp_path / "out" / "clipmoe_skipped.rank3.json"  # from an earlier 4-process run
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"documents": [{"task": "mmvet_local", "split": "test", "doc_id": 0, "error": "e"}]}))
    code, report = _run(tmp_path)
    assert code == 0 and report["ok"] and report["skipped_documents"] == 0 and not stale.exists()
    assert seen["model_args"]["dtype"] == "auto"  # float16 on a GPU, float32 on the CPU (resolved by the model)
    assert seen["model_args"]["skipped_report"] == str((tmp_path / "out").resolve())
    assert report["tasks"]["mmvet_local"] == {"metric": "gpt_eval_score", "value": 41.0, "n": 20, "status": "ok",
                                              "unjudged": 0, "skipped": 0}
    assert report["max_unjudged"] == 0.05
    header = capsys.readouterr().out.splitlines()[1]
    assert header.split(" | ")[4].strip() == "unjudged" and header.split(" | ")[5].strip() == "skipped"


def test_wrapper_fails_on_skipped_documents_unless_allowed(tmp_path, monkeypatch, capsys):
    _fake_lmms_eval(monkeypatch, skipped=[("vizwiz_vqa_val_local", 3), ("vizwiz_vqa_val_local", 6),
                                          ("mmvet_local", 1)])
    code, report = _run(tmp_path)
    assert code == 1 and not report["ok"] and report["skipped_documents"] == 3
    assert [(d["task"], d["doc_id"]) for d in report["skipped"]] == [
        ("mmvet_local", 1), ("vizwiz_vqa_val_local", 3), ("vizwiz_vqa_val_local", 6)]
    assert report["tasks"]["vizwiz_vqa_val_local"]["skipped"] == 2
    assert report["tasks"]["vizwiz_vqa_val_local"]["status"].startswith("failed: 2 document(s) skipped")
    assert "3 document(s) skipped" in capsys.readouterr().err
    code, report = _run(tmp_path, "--allow_skipped")
    assert code == 0 and report["ok"] and report["skipped_documents"] == 3
    assert report["tasks"]["mmvet_local"]["status"] == "ok" and report["tasks"]["mmvet_local"]["skipped"] == 1


def test_wrapper_unreadable_skip_report_fails_but_keeps_the_summary(tmp_path, monkeypatch):
    seen = _fake_lmms_eval(monkeypatch)
    launch = runner._launch

    def launch_then_break_rank1(command, env):
        code = launch(command, env)
        (Path(seen["model_args"]["skipped_report"]) / "clipmoe_skipped.rank1.json").write_text("{truncated")
        return code

    monkeypatch.setattr(runner, "_launch", launch_then_break_rank1)
    code, report = _run(tmp_path)
    assert code == 1 and report["skipped_documents"] == 1 and report["skipped"][0]["doc_id"] == -1
    assert "clipmoe_skipped.rank1.json: unreadable skipped-documents report" in report["skipped"][0]["error"]
    assert all(entry["status"] == "ok" for entry in report["tasks"].values())  # the scores themselves are kept


def test_wrapper_fails_above_the_unjudged_share(tmp_path, monkeypatch, capsys):
    _fake_lmms_eval(monkeypatch, unjudged=2, n_mmvet=30)  # 6.7 % > 5 %
    code, report = _run(tmp_path)
    assert code == 1 and report["tasks"]["mmvet_local"]["unjudged"] == 2
    assert report["tasks"]["mmvet_local"]["status"] == "failed: 2 of 30 answers unjudged (6.7% > --max_unjudged 0.05)"
    assert report["tasks"]["vizwiz_vqa_val_local"]["status"] == "ok"
    table = capsys.readouterr().out
    assert "failed: 2 of 30 answers unjudged" in table
    code, report = _run(tmp_path, "--max_unjudged", "0.1")
    assert code == 0 and report["tasks"]["mmvet_local"]["status"] == "ok"
    _fake_lmms_eval(monkeypatch, unjudged=1, n_mmvet=20)  # exactly 5 %: allowed
    assert _run(tmp_path)[0] == 0
    with pytest.raises(SystemExit) as error:
        _run(tmp_path, "--max_unjudged", "5")
    assert error.value.code == 2
    assert "argument --max_unjudged: '5' is not a share between 0 and 1 (e.g. 0.05)" in capsys.readouterr().err

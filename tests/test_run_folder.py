"""A run folder is a record: inputs are checked before it is touched, it is reused only with the same settings,
damaged files are named, unreadable data fails early, and what the logs say is exact."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from upcycle.cli import main, parse_config
from upcycle.engine import MetricsLog, StopRequested
from upcycle.mcl import ClusterBatchSampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_pairs(root: Path, good: int, fake: int = 0) -> Path:
    """``good`` small readable images (then ``fake`` files that are not images) with captions, as JSONL."""
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(good + fake):
        path = root / "img" / f"{i:03d}.png"
        if i < good:
            Image.new("RGB", (64, 64), (60 * (i % 4), 200 - 8 * (i // 4), 40)).save(path)
        else:
            path.write_bytes(b"this is not a png")
        lines.append(json.dumps({"image": f"img/{i:03d}.png", "caption": f"colour {i % 4} shade {i // 4}"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--output", str(out), "--base", "tiny-random", "--recipe", "dense",
            "--batch-size", "8", "--num-workers", "0", "--warmup-steps", "2", "--val-fraction", "0.1",
            "--context-length", "16", *extra]


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("data"), 48)


@pytest.fixture(scope="module")
def finished(pairs, tmp_path_factory) -> Path:
    """A finished dense run: 43 training pairs, batch 8 -> 5 steps."""
    return main(args(pairs, tmp_path_factory.mktemp("finished") / "run"))


@pytest.fixture
def copy_of(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


@pytest.mark.parametrize("extra, expected", [
    (["--base", "no/such/folder/"], "error: --base no/such/folder/: no such file or folder"),
    (["--data", "missing.jsonl"], "missing.jsonl"),
    (["--dense-lr", "2e-3", "--epochs", "2"],
     "error: {out} already holds a run with other settings ({out}/run_config.yaml): --dense-lr 1e-05 -> 0.002; "
     "--epochs 1 -> 2. A run folder is not reused with changed settings: pass --overwrite to delete its run files "
     "and start over, or choose another --output"),
    (["--resume", "--batch-size", "4"],
     "error: --resume continues the run in {out} with its saved settings ({out}/run_config.yaml), but these differ: "
     "--batch-size 8 -> 4. Drop the changes to resume, or start over with --overwrite (without --resume) or another "
     "--output"),
    (["--resume", "--max-samples", "40", "--recipe", "clip-up"], "differ: --max-samples None -> 40; --recipe dense -> "
                                                                  "clip-up. Drop"),
])
def test_a_refused_run_leaves_the_finished_run_byte_identical(finished, pairs, extra, expected):
    before = hashes(finished)
    with pytest.raises(SystemExit) as info:
        main(args(pairs, finished, *extra))
    message = str(info.value)
    expected = expected.format(out=finished)
    assert message == expected if expected.startswith("error:") else expected in message, message
    assert hashes(finished) == before


def test_data_edited_in_place_is_not_taken_for_the_finished_runs(finished, pairs, tmp_path):
    """The same --data path with other captions, or other pairs, is refused like a changed setting, with and
    without --resume; the finished run's files stay byte-identical."""
    data = tmp_path / "data"
    shutil.copytree(pairs.parent, data)
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    config = yaml.safe_load((run / "run_config.yaml").read_text())
    config["data"] = [str(data / "pairs.jsonl")]  # the copied run was made from the copied data
    (run / "run_config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
    main(args(data / "pairs.jsonl", run))  # same data, same settings: reused
    before = hashes(run)
    lines = (data / "pairs.jsonl").read_text().splitlines()
    edited = [line.replace('shade 0"', 'shade zero"') for line in lines]
    (data / "pairs.jsonl").write_text("\n".join(edited) + "\n")
    inputs = run / "work" / "inputs.json"
    for extra in ([], ["--resume"]):
        with pytest.raises(SystemExit) as info:
            main(args(data / "pairs.jsonl", run, *extra))
        assert f": the data ({inputs}): the captions of the 48 pairs changed (sha256 " in str(info.value)
        assert hashes(run) == before
    (data / "pairs.jsonl").write_text("\n".join(lines[:40]) + "\n")
    with pytest.raises(SystemExit) as info:
        main(args(data / "pairs.jsonl", run))
    assert f"other settings ({run}/run_config.yaml): the data ({inputs}): 48 pairs -> 40 pairs. " in str(info.value)
    assert hashes(run) == before


def test_the_same_settings_reuse_the_finished_stages(copy_of, pairs, capsys):
    metrics = (copy_of / "metrics.jsonl").read_bytes()
    weights = load_file(copy_of / "model.safetensors")
    capsys.readouterr()
    # --save-every and --num-workers do not change the result: allowed, with and without --resume
    main(args(pairs, copy_of, "--save-every", "3"))
    main(args(pairs, copy_of, "--resume", "--num-workers", "2"))
    printed = capsys.readouterr().out
    assert printed.count("[dense] already finished") == 2
    assert f"{copy_of} holds a run with the same settings: its finished stages are reused" in printed
    assert (copy_of / "metrics.jsonl").read_bytes() == metrics  # 5 steps, each once
    assert len(metrics.decode().splitlines()) == 5
    again = load_file(copy_of / "model.safetensors")
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    assert yaml.safe_load((copy_of / "run_config.yaml").read_text())["run"]["save_every"] == 50  # the latest call


def test_overwrite_starts_over(copy_of, pairs):
    (copy_of / "work" / "mcl-1").mkdir()
    (copy_of / "work" / "mcl-1" / "done.json").write_text("{}")
    (copy_of / "comparison.md").write_text("an old table")
    old = load_file(copy_of / "work" / "dense" / "model.safetensors")
    main(args(pairs, copy_of, "--dense-lr", "2e-3", "--overwrite"))
    assert yaml.safe_load((copy_of / "run_config.yaml").read_text())["optim"]["dense_lr"] == 2e-3
    assert sorted(p.name for p in (copy_of / "work").iterdir()) == ["dense", "inputs.json"]
    assert not (copy_of / "comparison.md").exists()
    lines = [json.loads(line) for line in (copy_of / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    new = load_file(copy_of / "work" / "dense" / "model.safetensors")
    assert not all(torch.equal(new[k], old[k]) for k in old)
    with pytest.raises(SystemExit) as info:
        main(args(pairs, copy_of, "--resume", "--overwrite"))
    assert str(info.value) == ("error: config: overwrite cannot be combined with resume: --resume continues the run "
                               "in --output, --overwrite deletes it and starts over")


def test_a_folder_with_run_files_but_no_settings_is_refused(finished, pairs, tmp_path):
    out = tmp_path / "model-only"
    out.mkdir()
    shutil.copy(finished / "model.safetensors", out)
    shutil.copy(finished / "config.json", out)
    before = hashes(out)
    with pytest.raises(SystemExit) as info:
        main(args(pairs, out))
    assert str(info.value) == (
        f"error: {out} holds run files (model.safetensors) but no run_config.yaml, so the settings they were made "
        "with are unknown and the folder cannot be continued or reused: pass --overwrite to delete its run files and "
        "start over, or choose another --output")
    assert hashes(out) == before


def test_a_truncated_stage_result_names_its_path(copy_of, pairs):
    path = copy_of / "work" / "dense" / "model.safetensors"
    truncate(path)
    with pytest.raises(SystemExit) as info:
        main(args(pairs, copy_of))
    assert str(info.value).startswith(f"error: {path}: cannot read the weights of the finished stage dense "
                                      "(SafetensorError: ")
    assert str(info.value).endswith(f"delete the stage folder {path.parent} to train the stage again")


def test_a_truncated_checkpoint_names_its_path(pairs, tmp_path):
    out = tmp_path / "stopped"
    with pytest.raises(StopRequested):
        main(args(pairs, out, "--save-every", "2", "--stop-after-steps", "3"))
    ckpt = out / "work" / "dense" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000003"]
    kept = tmp_path / "kept"
    shutil.copytree(out, kept)
    truncate(ckpt / "step-00000003" / "model.safetensors")
    with pytest.raises(SystemExit) as info:
        main(args(pairs, out, "--resume"))
    assert str(info.value).startswith(f"error: {ckpt}/step-00000003/model.safetensors: cannot read the checkpoint's "
                                      "weights (SafetensorError: ")
    assert str(info.value).endswith(f"delete {ckpt} to restart the stage dense from its beginning")
    state = kept / "work" / "dense" / "checkpoint" / "step-00000003" / "state.pt"
    truncate(state)
    with pytest.raises(SystemExit) as info:
        main(args(pairs, kept, "--resume"))
    assert str(info.value).startswith(f"error: {state}: cannot read the checkpoint's optimizer state (")


def test_truncated_cluster_labels_name_their_path_and_held_out_pairs_are_labelled(pairs, tmp_path, capsys):
    out = tmp_path / "dmu"
    with pytest.raises(StopRequested):
        main(args(pairs, out, "--recipe", "dmu", "--clusters", "2", "--mcl-leftover", "mixed", "--stop-after-steps",
                  "1"))
    printed = capsys.readouterr().out
    # 48 pairs, 5 held out: labelled as held out, not as unreadable
    assert "0 unreadable pairs excluded, 5 held out for validation" in printed
    assert "; 5 held out for validation\n" in printed  # the stage's batch summary
    path = out / "work" / "labels-stage1.npy"
    labels = np.load(path)
    assert (labels == -1).sum() == 5 and (labels >= 0).sum() == 43
    truncate(path)
    with pytest.raises(SystemExit) as info:
        main(args(pairs, out, "--recipe", "dmu", "--clusters", "2", "--mcl-leftover", "mixed", "--resume"))
    assert str(info.value).startswith(f"error: {path}: cannot read the cached MCL cluster labels (ValueError: ")
    assert str(info.value).endswith("delete it to cluster again (or start over with --overwrite)")


def test_a_truncated_base_names_it(pairs, tmp_path):
    from transformers import CLIPModel

    from clipmoe_vlm.loading import tiny_clip_config

    base = tmp_path / "base"
    CLIPModel(tiny_clip_config()).save_pretrained(base)
    truncate(base / "model.safetensors")
    with pytest.raises(SystemExit) as info:
        main(args(pairs, tmp_path / "run", "--base", str(base)))
    assert str(info.value).startswith(f"error: --base {base}: cannot load it (SafetensorError: ")
    assert not (tmp_path / "run").exists()


def test_sampler_labels_held_out_and_unreadable_pairs_apart():
    labels = np.array([-1] * 3 + [-2] * 2 + [0] * 8)
    sampler = ClusterBatchSampler(labels, 4)
    assert len(sampler) == 2
    assert sampler.stats.summary("drop") == (
        "1 clusters, 2 global batches, 8 samples used; 0 samples (0 clusters smaller than a global batch, plus "
        "remainders) not used this epoch; 3 held out for validation, 2 unreadable")
    assert (sampler.stats.excluded, sampler.stats.held_out, sampler.stats.unreadable) == (5, 3, 2)


@pytest.mark.parametrize("decode", ["--decode-once", "--no-decode-once"])
def test_no_readable_image_fails_before_training(tmp_path, decode, monkeypatch):
    monkeypatch.setenv("CLIPMOE_CACHE", str(tmp_path / "cache"))
    data = write_pairs(tmp_path / "data", 0, fake=3)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(args(data, out, "--val-fraction", "0", decode))
    first = f"unreadable image: {data.parent / 'img' / '000.png'} (UnidentifiedImageError: "
    if decode == "--no-decode-once":
        assert str(info.value).startswith(f"error: --data: no image of the 3 training pairs can be read (first: {first}")
        assert str(info.value).endswith("); nothing to train on")
    else:  # the decoded-pairs cache finds it while decoding
        assert str(info.value).startswith(f"error: no image of the data could be read ({first}")
    assert not out.exists()


def test_unreadable_files_are_counted_once_over_epochs(tmp_path, capsys):
    data = write_pairs(tmp_path / "data", 32, fake=3)
    out = main(args(data, tmp_path / "run", "--val-fraction", "0", "--batch-size", "5", "--epochs", "2"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"] == 3  # three files, each read in both epochs
    assert sorted(e[0] for e in summary["skipped_examples"]) == ["32", "33", "34"]
    assert "Unreadable images skipped: 3." in (out / "README.md").read_text()
    assert "skipped 3 unreadable images (first: " in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 14  # 35 pairs / 5, two epochs


def test_dmu_with_one_cluster_is_refused():
    with pytest.raises(SystemExit) as info:
        main(["--data", "x.jsonl", "--recipe", "dmu", "--clusters", "1"])
    assert str(info.value) == (
        "error: config: clusters (--clusters) is 1 with recipe dmu: every MCL stage would then train a copy of the "
        "base on the same batches in the same order, so experts 1 to 3 would be identical (MCL makes the experts "
        "differ through the clusters of the earlier stages); use --clusters 2 or more (CLIP-MoE: 3)")
    assert parse_config(["--data", "x.jsonl", "--recipe", "clip-up", "--clusters", "1"]).mcl.clusters == 1


def test_metrics_rewind_drops_what_was_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"stage": "a", "step": s} for s in (1, 2)] + [{"stage": "b", "step": s} for s in (1, 2)] + \
        [{"stage": "b", "epoch_end": 1}] + [{"stage": "b", "step": s} for s in (3, 4)] + \
        [{"stage": "b", "epoch_end": 2}, {"stage": "b", "step": 5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"stage": "b", "st')  # torn by a kill
    log = MetricsLog(path)
    log.rewind("b", 4, steps_per_epoch=2)  # the checkpoint of step 4 is written before epoch 2's probe
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:7]
    log({"stage": "b", "epoch_end": 2})
    log.rewind("b", 0, steps_per_epoch=2)  # the stage starts again
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:2]
    MetricsLog(tmp_path / "other.jsonl", enabled=False)({"stage": "b"})
    assert not (tmp_path / "other.jsonl").exists()


def test_tensorboard_scalars_are_the_metrics_lines_after_a_kill_and_resume(pairs, tmp_path):
    """--tensorboard writes each stage's metrics as scalars; after a kill past the last checkpoint and a resume,
    TensorBoard shows every step once, with the values metrics.jsonl keeps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    ckpt = out / "work" / "dense" / "checkpoint"
    with pytest.raises(StopRequested):
        main(args(pairs, out, "--tensorboard", "--stop-after-steps", "2"))
    shutil.copytree(ckpt, tmp_path / "step-2")
    with pytest.raises(StopRequested):  # steps 3 and 4 logged, then killed with the checkpoint of step 2 the last
        main(args(pairs, out, "--tensorboard", "--resume", "--stop-after-steps", "2"))
    shutil.rmtree(ckpt)
    shutil.copytree(tmp_path / "step-2", ckpt)
    main(args(pairs, out, "--tensorboard", "--resume"))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    events = EventAccumulator(str(out / "tensorboard" / "dense"))
    events.Reload()
    for tag in ("loss", "lr"):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in lines], tag
    assert "`tensorboard/`" in (out / "README.md").read_text()


def test_tensorboard_without_its_package_is_refused_naming_the_flag(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else
                        find_spec(name, *a))
    with pytest.raises(SystemExit) as info:
        main(["--data", "x.jsonl", "--tensorboard"])
    assert str(info.value) == (
        "error: config: tensorboard (--tensorboard) needs the tensorboard package, which is not installed: pip "
        "install tensorboard (or the project's extra: pip install 'clipmoe-vlm[tensorboard]')")


def test_resume_into_a_folder_without_a_run_says_it_starts_one(pairs, tmp_path, capsys):
    out = main(args(pairs, tmp_path / "run", "--resume"))
    assert f"--resume: {out} holds no run to continue; starting a new one" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]

"""End-to-end upcycling runs on a tiny base and tiny data: dmu, resume, two processes, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import AutoModel

from clipmoe_vlm import CLIPMoEModel
from upcycle.cli import main
from upcycle.engine import StopRequested

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """96 small images of a coloured square or circle on grey, with captions."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "img").mkdir()
    lines = []
    for i in range(96):
        colour = list(COLOURS)[i % 4]
        shape = "circle" if (i // 4) % 2 else "square"
        size = 10 + (i // 8) % 3 * 6
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        box = (32 - size, 32 - size, 32 + size, 32 + size)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        image.save(root / "img" / f"{i:03d}.png")
        lines.append(json.dumps({"image": f"img/{i:03d}.png", "caption": f"a {colour} {shape}"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--output", str(out), "--base", "tiny-random", "--batch-size", "8", "--num-workers", "0",
            "--clusters", "2", "--mcl-leftover", "mixed", "--warmup-steps", "2", "--mcl-lr", "1e-3",
            "--router-lr", "1e-3", "--val-fraction", "0.1", "--context-length", "16", *extra]


def test_dmu_run_produces_distinct_experts_and_reloads(pairs, tmp_path):
    out = main(run_args(pairs, tmp_path / "dmu"))
    model = AutoModel.from_pretrained(out).eval()
    assert isinstance(model, CLIPMoEModel)
    for tower in (model.vision_model, model.text_model):
        experts = tower.encoder.layers[0].mlp.experts.up_proj
        assert experts.shape[0] == 4
        for a in range(4):
            for b in range(a + 1, 4):
                assert not torch.allclose(experts[a], experts[b]), (a, b)
    # expert 0 is the base FFN (tiny-random base, seed 0)
    from clipmoe_vlm.loading import load_clip
    base = load_clip("tiny-random", seed=0)
    assert torch.equal(model.vision_model.encoder.layers[1].mlp.experts.up_proj[0],
                       base.vision_model.encoder.layers[1].mlp.fc1.weight)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["mcl-1", "mcl-2", "mcl-3", "router"]
    loads = torch.tensor(summary["validation"]["expert_load"]["image"])
    assert loads.shape == (4, 4) and not torch.allclose(loads, torch.full_like(loads, 0.25))
    # the saved folder computes what the run's final stage computed
    final = CLIPMoEModel(model.config).eval()
    final.load_state_dict(load_file(out / "work" / "router" / "model.safetensors"))
    px, ids = torch.randn(2, 3, 64, 64), torch.randint(1, 400, (2, 16))
    torch.testing.assert_close(model(input_ids=ids, pixel_values=px).logits_per_image,
                               final(input_ids=ids, pixel_values=px).logits_per_image, atol=0, rtol=0)
    card = (out / "README.md").read_text()
    assert "recipe `dmu`" in card and "Held-out retrieval" in card
    assert len((out / "metrics.jsonl").read_text().splitlines()) == sum(s["steps"] for s in summary["stages"])


RESUME_ARGS = ["--recipe", "clip-up", "--expert-dropout", "0.1", "--epochs", "2", "--clipup-lr", "1e-3"]


@pytest.fixture(scope="module")
def uninterrupted(pairs, tmp_path_factory) -> Path:
    """The clip-up run the resumed runs must reproduce: 86 training pairs, batch 8, 2 epochs -> 20 steps."""
    return main(run_args(pairs, tmp_path_factory.mktemp("full") / "run", *RESUME_ARGS, "--save-every", "3"))


def assert_same_weights(a: Path, b: Path) -> None:
    full, resumed = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0, msg=key)


def test_resume_after_kill_matches_uninterrupted_run(pairs, tmp_path, uninterrupted):
    with pytest.raises(StopRequested):
        main(run_args(pairs, tmp_path / "killed", *RESUME_ARGS, "--save-every", "3", "--stop-after-steps", "13"))
    main(run_args(pairs, tmp_path / "killed", *RESUME_ARGS, "--save-every", "3", "--resume"))
    assert_same_weights(uninterrupted, tmp_path / "killed")


def test_grouped_mm_resume_matches_with_deterministic_algorithms(pairs, tmp_path):
    """The grouped_mm kernel gathers a bias row per token; on the CPU that gather's backward sums in a varying order,
    so two grouped_mm runs differ in the last bits. With --deterministic a killed and resumed grouped_mm run equals
    an uninterrupted one, and the switch is off again after each run."""
    args = [*RESUME_ARGS, "--experts-implementation", "grouped_mm", "--deterministic", "--save-every", "3"]
    full = main(run_args(pairs, tmp_path / "full", *args))
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(StopRequested):
        main(run_args(pairs, tmp_path / "killed", *args, "--stop-after-steps", "13"))
    main(run_args(pairs, tmp_path / "killed", *args, "--resume"))
    assert_same_weights(full, tmp_path / "killed")
    assert not torch.are_deterministic_algorithms_enabled()


def assert_whole_files(folder: Path, allow_tmp: bool) -> None:
    """Every file of ``folder`` reads completely; ``.tmp`` names (a write cut by the kill) only if allowed."""
    for path in sorted(folder.rglob("*")):
        if ".tmp" in path.name:
            assert allow_tmp, path
            continue
        if not path.is_file():
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".yaml":
            assert isinstance(yaml.safe_load(path.read_text()), dict)
        elif path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".npy":
            np.load(path)
        elif path.suffix == ".pt":
            torch.load(path, weights_only=False)


def test_resume_after_a_real_kill(pairs, tmp_path, uninterrupted):
    """A real process, killed with SIGKILL once it has written a checkpoint, then resumed with --resume."""
    out = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "scripts" / "upcycle_encoder.py"),
               *run_args(pairs, out, *RESUME_ARGS, "--save-every", "2")]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            saved = [int(p.name[5:]) for p in out.glob("work/*/checkpoint/step-*") if ".tmp" not in p.name]
            # kill once steps past the checkpoint are logged (usually: the race may let one more checkpoint in)
            if saved and len((out / "metrics.jsonl").read_text().splitlines()) > max(saved):
                break
            time.sleep(0.01)
        running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert running, "the run ended before it could be killed:\n" + (tmp_path / "first.log").read_text()[-3000:]
    assert not (out / "model.safetensors").exists()
    assert_whole_files(out, allow_tmp=True)
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[clip-up] resumed at step " in resumed.stdout
    assert_whole_files(out, allow_tmp=False)
    assert_same_weights(uninterrupted, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [("clip-up", step) for step in range(1, 21)]
    assert (out / "work" / "clip-up" / "done.json").is_file() and not (out / "work" / "clip-up" / "checkpoint").exists()


@pytest.mark.parametrize("bad, message", [
    (["--base", "no/such/folder/"], "--base"),
    (["--top-k", "5"], "top_k"),
    (["--recipe", "clip-up", "--data", "missing.jsonl"], "missing.jsonl"),
])
def test_bad_input_fails_before_work(pairs, tmp_path, bad, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(run_args(pairs, tmp_path / "bad", *bad))
    assert message in str(info.value)
    assert not (tmp_path / "bad").exists()  # checked before the output folder is made


def test_broken_line_and_non_image(pairs, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(pairs.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"broken\.jsonl.*2|line 2"):
        main(run_args(broken, tmp_path / "b1"))
    # an image that is not an image is skipped and counted, the run finishes
    root = pairs.parent
    (root / "img" / "fake.png").write_bytes(b"this is not a png")
    mixed = root / "mixed.jsonl"
    mixed.write_text(pairs.read_text() + json.dumps({"image": "img/fake.png", "caption": "a fake"}) + "\n")
    out = main(run_args(mixed, tmp_path / "b2", "--recipe", "dense", "--val-fraction", "0"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"] == 1


def test_two_processes_match_one(pairs, tmp_path):
    """Two DDP processes on the CPU with per-process batch 4 == one process with batch 8.

    accelerate 1.15 runs ``launch --cpu --num_processes 2`` as a single process (its CPU multi-process path needs
    mpirun); ``launch --multi_gpu --num_processes 2`` on a machine without GPUs starts two gloo processes.
    """
    # A small learning rate: routing is discrete and Adam turns float-level differences of near-zero gradients
    # into full-size steps, so long runs at a high rate drift apart even when every batch is the same.
    common = ["--recipe", "clip-up", "--expert-dropout", "0", "--clipup-lr", "1e-6", "--val-fraction", "0",
              "--max-samples", "32"]
    one = run_args(pairs, tmp_path / "one", *common)
    main(one)
    two = run_args(pairs, tmp_path / "two", *common)
    two[two.index("--batch-size") + 1] = "4"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(ROOT / "scripts" / "upcycle_encoder.py"), *two],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout + proc.stderr
    logs = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 4  # same number of global batches: one metrics line per step
    for a, b in zip(*logs):
        # the contrastive loss is over the gathered global batch: the same; the router losses are each process's
        # own statistics over its half of the tokens (as in CLIP-MoE's and Mixtral's DDP training)
        assert a["clip_loss"] == pytest.approx(b["clip_loss"], abs=2e-5)
        assert a["aux_loss"] == pytest.approx(b["aux_loss"], abs=2e-3)
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=key)
    # the same settings in one process are another run (the global batch follows the processes): refused
    with pytest.raises(SystemExit) as info:
        main(two)
    assert f"the number of processes ({tmp_path / 'two' / 'work' / 'inputs.json'}): 2 -> 1 (--batch-size is per " \
           "process: the global batch and the steps follow it)" in str(info.value)


def test_two_processes_skip_an_all_unreadable_batch_together(tmp_path):
    """When one process's share of a global batch has no readable image, both processes skip that step (and stay
    in step: same number of steps, the run finishes)."""
    from upcycle.mcl import ClusterBatchSampler

    # rank 1's share of the first global batch (32 pairs, 4 per process, seed 0) is unreadable
    bad = set(next(iter(ClusterBatchSampler(np.zeros(32, dtype=np.int64), 4, 2, 1, seed=0))))
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(32):
        path = tmp_path / "img" / f"{i}.png"
        if i in bad:
            path.write_bytes(b"not a png")
        else:
            Image.new("RGB", (64, 64), (60 * (i % 4), 100, 6 * i)).save(path)
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": f"colour {i}"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = ["--data", str(tmp_path / "pairs.jsonl"), "--output", str(out), "--base", "tiny-random", "--recipe",
            "dense", "--batch-size", "4", "--num-workers", "0", "--val-fraction", "0", "--context-length", "16",
            "--warmup-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CLIPMOE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(ROOT / "scripts" / "upcycle_encoder.py"), *args],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["skipped_batch"] == "no readable image (on at least one process)" and "loss" not in records[0]
    assert all("loss" in r and "skipped_batch" not in r for r in records[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"] == 4 and summary["stages"][0]["steps"] == 4  # rank 1's files, gathered


def test_bf16_autocast_run(pairs, tmp_path):
    # its own process: accelerate keeps one AcceleratorState per process, fixed at the first precision used
    out = tmp_path / "bf16"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "upcycle_encoder.py"),
                           *run_args(pairs, out, "--recipe", "clip-up", "--bf16", "--max-samples", "32",
                                     "--val-fraction", "0.25")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(l == l and l < 20 for l in losses)  # finite
    model = AutoModel.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.float32  # autocast: weights stay fp32


def test_decoded_pairs_train_exactly_as_the_streaming_loader(pairs, tmp_path, monkeypatch):
    """The same run from pairs decoded once (tensors in memory, cached) and from the streaming loader: the same
    per-step losses and the same weights."""
    monkeypatch.setenv("CLIPMOE_CACHE", str(tmp_path / "cache"))
    runs = {}
    for mode in ("--decode-once", "--no-decode-once"):
        out = main(run_args(pairs, tmp_path / mode.strip("-"), "--recipe", "dense", mode))
        runs[mode] = ([json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()],
                      load_file(out / "model.safetensors"))
    (losses_a, weights_a), (losses_b, weights_b) = runs.values()
    assert len(losses_a) == 10 and losses_a == losses_b  # 86 training pairs / batch 8
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert len(list((tmp_path / "cache" / "decoded").glob("pairs-*.safetensors"))) == 1

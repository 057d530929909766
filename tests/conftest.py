"""Shared fixtures: tiny models built from configs (no downloads), fixed seeds, CPU."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from pathlib import Path

# first: registers the Auto classes and sets the OpenMP wait policy, which acts only before torch loads
import clipmoe_vlm  # noqa: F401, I001
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                   patch_size=8)
TINY_TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
                 max_position_embeddings=16, eos_token_id=98, bos_token_id=97, pad_token_id=0)


@pytest.fixture
def tiny_clip_config() -> CLIPConfig:
    return CLIPConfig(vision_config=dict(TINY_VISION), text_config=dict(TINY_TEXT), projection_dim=16)


@pytest.fixture
def tiny_dense_clip(tiny_clip_config) -> CLIPModel:
    torch.manual_seed(0)
    return CLIPModel(tiny_clip_config).eval()


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def input_ids() -> torch.Tensor:
    ids = torch.randint(1, 97, (3, 10), generator=torch.Generator().manual_seed(2))
    ids[:, -1] = 98  # end-of-text
    return ids


# ---- shared by the encoder-evaluation and routing tests: a tiny Shapes world, a tiny CLIP-MoE ----
SMALL_WORLD = {"n_train": 8, "n_pretrain": 4, "n_instruct": 4, "n_eval": 8, "n_mmvet": 4, "n_retrieval": 12,
               "n_zeroshot_per_class": 2, "n_mmvp_pairs": 2, "progress": False}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a shared CPU: one intra-op thread is ~10x faster than several fighting for the cores
    (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny Shapes world (one per test module; modules with their own ``world`` override it)."""
    from clipmoe_vlm.data.shapes import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, seed=0, **SMALL_WORLD)
    return root


@pytest.fixture(scope="module")
def tiny_moe():
    """A random 4-expert top-2 CLIP-MoE upcycled from the tiny CLIP of ``clipmoe_vlm.loading.tiny_clip_config``."""
    from clipmoe_vlm.loading import tiny_clip_config
    from upcycle import sparse_upcycle

    torch.manual_seed(0)
    return sparse_upcycle(CLIPModel(tiny_clip_config()), num_experts=4, top_k=2).eval()


# ---- an OpenAI-compatible chat-completions judge on the loopback interface (lmms-eval tests) ----
class ChatJudge:
    """Base of the mock LLM judges: subclasses implement ``reply(prompt, body) -> str``; `serve_judge` runs one
    and yields its base URL."""

    def reply(self, prompt: str, body: dict) -> str:
        raise NotImplementedError


@contextlib.contextmanager
def serve_judge(judge: ChatJudge):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = judge.reply(body["messages"][-1]["content"], body)
            data = json.dumps({"id": "mock", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": content}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def tiny_moe_llava(image_token_id: int = 120, image_seq_length: int = 16):
    """A LLaVA with a tiny CLIP-MoE vision tower (4 experts, top-2) and a tiny Llama, seeded, randomly initialised."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from clipmoe_vlm import CLIPMoEVisionConfig

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPMoEVisionConfig(**TINY_VISION, num_experts=4, top_k=2),
        text_config=LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_id=image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=image_seq_length)
    return LlavaForConditionalGeneration(config)

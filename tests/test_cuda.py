"""The accelerator paths: the kNN search on the device, attention with the bias's gradient, and train → resume →
generate with memory, the token store and the kNN store on the device (bf16 autocast: test_memory.py, on each device).

They run on CUDA, and are skipped where there is none. MIDIGEN_TEST_DEVICE=cpu runs the same checks on the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SINGLE_STREAM

from midigen.codec import load_tokenizer
from midigen.inference.generate import generate, load_prompt
from midigen.inference.sampling import SamplingConfig
from midigen.model import ModelConfig, MusicTransformer
from midigen.model.memory import KnnMemory, MemoryState
from midigen.training.config import TrainConfig
from midigen.inference.model_files import load_model
from midigen.training.recipe import train

DEVICE = torch.device(os.environ.get("MIDIGEN_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")
CPU = torch.device("cpu")


def segments(count: int, lanes: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Random tokens (lanes, length + 1), with their bars and beats."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(4, 388, (lanes, length + 1), generator=g), torch.randint(0, 8, (lanes, length + 1), generator=g),
             torch.randint(0, 64, (lanes, length + 1), generator=g)) for _ in range(count)]


def test_knn_search_on_the_device_equals_faiss_on_the_cpu() -> None:
    torch.manual_seed(0)
    on_device, on_cpu = (KnnMemory(3, 2, 16, 500, 8, device) for device in (DEVICE, CPU))
    for _ in range(3):
        keys = torch.nn.functional.normalize(torch.randn(3, 2, 200, 16), dim=-1)  # wraps round the store
        values, valid = torch.randn_like(keys), torch.rand(3, 200) < 0.9
        on_device.write(keys.to(DEVICE), values.to(DEVICE), valid.to(DEVICE))
        on_cpu.write(keys, values, valid)
    queries = torch.nn.functional.normalize(torch.randn(3, 2, 9, 16), dim=-1)
    got, expected = on_device.search(queries.to(DEVICE)), on_cpu.search(queries)
    assert got.rows.device.type == DEVICE.type
    torch.testing.assert_close(got.scores.cpu(), expected.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.values[got.rows].cpu(), expected.values[expected.rows])


@pytest.mark.parametrize("mode", ["none", "xl", "knn"])
@pytest.mark.parametrize("knn_device", [DEVICE, CPU])
def test_training_steps_on_the_device_equal_the_cpu_ones(mode: str, knn_device: torch.device) -> None:
    """Attention (SDPA with the bias's gradient there, CpuAttention here), the memories and the retrieval, with the
    kNN stores on the device or in CPU memory."""
    config = ModelConfig.preset("tiny", SINGLE_STREAM, memory=mode, dropout=0.0, attn_dropout=0.0)
    results = []
    for device in (CPU, DEVICE):
        torch.manual_seed(0)
        model = MusicTransformer(config).to(device).train()
        memory = MemoryState(config, 2, device, knn_device if device == DEVICE else CPU)
        losses = []
        for tokens, bars, beats in segments(4, 2, config.context):
            tokens, bars, beats = tokens.to(device), bars.to(device), beats.to(device)
            output = memory.forward(model, tokens[:, :-1], {"bars": bars[:, :-1], "beats": beats[:, :-1]},
                                    targets=tokens[:, 1:],
                                    new_song=torch.zeros(2, dtype=torch.bool, device=device))
            output.loss.backward()
            losses.append(output.loss.item())
        results.append((losses, {name: p.grad.cpu() for name, p in model.named_parameters()}))
    (cpu_losses, cpu_grads), (device_losses, device_grads) = results
    np.testing.assert_allclose(device_losses, cpu_losses, rtol=1e-4)
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(device_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("mode", ["xl", "knn"])
@pytest.mark.parametrize("location", ["gpu", "cpu", "auto"])
def test_train_resume_and_generate_on_the_device(mode: str, location: str, prompt_store: Path, tmp_path: Path) -> None:
    """The token store and the kNN stores on the GPU, in CPU memory, or wherever they fit."""
    run = tmp_path / mode
    model_config = ModelConfig.preset("tiny", SINGLE_STREAM, memory=mode, context=32)
    if DEVICE.type != "cuda" and location == "gpu":
        pytest.skip("the gpu data location needs CUDA")
    settings = dict(batch_size=3, eval_interval=4, log_interval=2, warmup_steps=2, device=DEVICE.type,
                    eval_tokens=2000, data_location=location)
    train(prompt_store, run, model_config, TrainConfig(max_steps=4, **settings), progress=False)
    result, _ = train(prompt_store, run, None, TrainConfig(max_steps=8, **settings), resume=True, progress=False)
    assert result.step == 8 and np.isfinite(result.val["val_loss"])
    trained = load_model(run, DEVICE.type)
    tokenizer = load_tokenizer(SINGLE_STREAM)
    prompt = load_prompt(sorted((Path(__file__).parent / "data" / "prompts").glob("*.mid"))[0], 100, tokenizer)
    generation = generate(trained, prompt, SamplingConfig(seed=0), new_tokens=100)
    assert tokenizer.grammar.check(generation.sequence.tokens) is None

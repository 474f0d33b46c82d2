"""torch.compile captures the training step whole (fullgraph=True), every speedrun option on, so the GPU
path (train.py compiles the model) cannot silently fall back to eager or break.

On CPU the graph is traced by Dynamo and differentiated by AOTAutograd (backend "aot_eager": the same
capture as inductor's, without its minutes of C++ compilation on 2 cores); on a GPU, inductor itself.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SPEEDRUN_OPTIONS, randomized, small_config

from gpt2lab import GPT


def compiled_step_matches_eager(device: str, backend: str, overrides: dict) -> None:
    torch._dynamo.reset()
    eager = randomized(GPT(small_config(**overrides))).to(device).train()
    twin = randomized(GPT(small_config(**overrides))).to(device).train()
    compiled = torch.compile(twin, fullgraph=True, backend=backend)  # a graph break is an error
    idx, targets = torch.randint(0, 101, (2, 2, 32), device=device).unbind(0)
    loss_c, loss_e = compiled(idx, targets), eager(idx, targets)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gpt2", "speedrun"])
def test_training_step_compiles_whole_on_cpu(variant):
    compiled_step_matches_eager("cpu", "aot_eager", SPEEDRUN_OPTIONS if variant == "speedrun" else {})


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["gpt2", "speedrun"])
def test_training_step_compiles_whole_with_inductor_on_gpu(variant):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    compiled_step_matches_eager("cuda", "inductor", SPEEDRUN_OPTIONS if variant == "speedrun" else {})

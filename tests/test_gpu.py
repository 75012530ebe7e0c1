"""The CUDA path on a real GPU: bundles optimized for CUDA token for token with PyTorch, fp16 within its gate, the
caches kept on the device between steps. Skipped without onnxruntime-gpu and a CUDA device; scripts/gpu_check.sh
runs them on one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgeformer.model.generate import generate
from edgeformer.model.tasks import get_task
from edgeformer.runtime.bundle import Manifest
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.session import Runtime
from tests.helpers import random_sources

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                 reason="no CUDA: onnxruntime-gpu with a CUDA GPU is needed (scripts/gpu_check.sh)")]

GREEDY = GenerationConfig(max_new_tokens=12)
BEAM = GenerationConfig(strategy="beam", num_beams=4, num_return_sequences=2, max_new_tokens=12)


@pytest.fixture(scope="module")
def cuda_bundles(exported, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped model exported, optimized for CUDA, and fp16 made from that, as a GPU deployment chains them."""
    from edgeformer.transforms.derive import optimize, quantize

    _, fp32 = exported("demo")
    root = tmp_path_factory.mktemp("cuda")
    # written even if it misses its gate, so that the tests below run: the gate has a test of its own
    optimize(fp32, root / "optimized", provider="cuda", allow_drop=True)
    quantize(root / "optimized", root / "fp16", to="fp16")
    return {"fp32": fp32, "fp32-optimized": root / "optimized", "fp16": root / "fp16"}


def test_a_bundle_optimized_for_cuda_passes_the_optimized_gate(cuda_bundles) -> None:
    """Fusions change float arithmetic and no more: within 1e-4 of the fp32 bundle's log-probabilities on CUDA too
    (on an H200 it measured 1.07e-3: README, "On an NVIDIA GPU")."""
    parity = Manifest.load(cuda_bundles["fp32-optimized"]).variant_parity
    assert parity["misses"] == [], parity


@pytest.mark.parametrize("gen", [GREEDY, BEAM], ids=["greedy", "beam"])
def test_a_bundle_optimized_for_cuda_equals_pytorch_token_for_token(exported, cuda_bundles, gen) -> None:
    model, _ = exported("demo")
    manifest = Manifest.load(cuda_bundles["fp32-optimized"])
    assert manifest.transforms[0]["provider"] == "CUDAExecutionProvider"
    rt = Runtime(cuda_bundles["fp32-optimized"], providers=["cuda"])
    assert rt.provider == "CUDAExecutionProvider"
    src = random_sources(64, model.config.src_vocab_size, seed=3)
    ours, ref = rt.generate(src, gen), generate(model, src, gen)
    assert [[h.tokens for h in hs] for hs in ours] == [[h.tokens for h in hs] for hs in ref]
    for hs_ours, hs_ref in zip(ours, ref, strict=True):
        assert [h.score for h in hs_ours] == pytest.approx([h.score for h in hs_ref], abs=1e-3)


def test_fp16_on_cuda_keeps_the_shipped_tasks_answers(exported, cuda_bundles) -> None:
    """fp16 against PyTorch fp32: at least 99% of greedy outputs the same; the largest score difference printed."""
    model, _ = exported("demo")
    rt = Runtime(cuda_bundles["fp16"], providers=["cuda"])
    assert rt.provider == "CUDAExecutionProvider" and rt.manifest.variant == "fp16"
    assert rt.tokenizer is not None
    pairs = get_task("dates").pairs(300, "test", seed=5)
    src = rt.tokenizer.encode_batch([s for s, _ in pairs])
    ours, ref = rt.generate(src), generate(model, src)
    same = [a[0].tokens == b[0].tokens for a, b in zip(ours, ref, strict=True)]
    worst = max((abs(a[0].score - b[0].score) / max(1, len(a[0].tokens))
                 for a, b, s in zip(ours, ref, same, strict=True) if s), default=float("inf"))
    print(f"fp16 on CUDA: {sum(same)}/{len(same)} greedy outputs equal PyTorch fp32's; largest difference of a "
          f"token's mean log-probability {worst:.2e}")
    assert sum(same) / len(same) >= 0.99
    assert worst < 2e-2  # the fp16 gate's max log-prob difference


def test_the_caches_stay_on_the_gpu_between_greedy_steps(exported, cuda_bundles, monkeypatch) -> None:
    """Each step's self-attention cache is bound to the next step where onnxruntime left it, on the device, and the
    cross-attention keys and values stay where the encoder wrote them: no cache goes through the host."""
    import edgeformer.runtime.session as session

    model, _ = exported("demo")
    devices: list[set[str]] = []
    step = session._Steps._step

    def spy(self: Any, tokens: np.ndarray, wanted: tuple[str, ...]) -> Any:
        outputs = step(self, tokens, wanted)
        devices.append({v.device_name().lower() for v in [*self.past.values(), *self.fixed.values()]
                        if not isinstance(v, np.ndarray)}
                       | ({"host"} if any(isinstance(v, np.ndarray) for v in self.past.values()) else set()))
        return outputs

    monkeypatch.setattr(session._Steps, "_step", spy)
    rt = Runtime(cuda_bundles["fp32-optimized"], providers=["cuda"])
    rt.generate(random_sources(8, model.config.src_vocab_size, seed=4), GenerationConfig(max_new_tokens=6,
                                                                                           ignore_eos=True))
    assert len(devices) == 6 and all(d == {"cuda"} for d in devices), devices

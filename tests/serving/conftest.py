"""The serving tests' adapters and their module-wide server (a real uvicorn on loopback)."""

import pytest
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.serving import BackgroundServer, Limits, build_engine
from tests.helpers import randomize_lora


@pytest.fixture(scope="module")
def adapter_dir(causal_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        model = AutoModelForCausalLM.from_pretrained(causal_dir)
        # beta is a DoRA adapter: its rows share the batch with plain LoRA rows (vLLM serves no DoRA)
        # dropout as `lorakit train` saves it: served replies must still be deterministic (eval mode)
        lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                       target_modules=["q_proj", "v_proj", "down_proj"], use_dora=name == "beta"))
        randomize_lora(model, scale=0.8, seed=i)
        lk.save_adapter(model, root / name)
    return root


@pytest.fixture(scope="module")
def server(causal_dir, adapter_dir):
    engine = build_engine(causal_dir, {"alpha": adapter_dir / "alpha", "beta": adapter_dir / "beta"},
                          adapter_dir=str(adapter_dir), limits=Limits(max_new_tokens=32, max_prompt_tokens=40,
                                                                      max_body_bytes=4000, max_queue=64))
    with BackgroundServer(engine) as running:
        yield running

"""Shared test helpers (no fixtures: those live in the conftest.py files): tiny random-init models
of several families, on-disk data builders, and the small drivers tests share (a zoo forward, the
CLI, a training run's options, offline generation for the server tests, a serving engine and the
sinks that record its requests)."""

import random
import shutil
import threading
import time

import httpx
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import lorakit as lk
from lorakit.cli import main
from lorakit.serving import Limits, build_engine
from lorakit.serving.requests import Request
from lorakit.training.options import resolve_options
from tests.zoo import main_output

# lorakit's C++ kernels build with the machine's compiler; without one their tests have nothing to run
needs_compiler = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler here")

# --- tiny models ---------------------------------------------------------------------------------
VOCAB = 96


def tiny_bert(seed=0, num_labels=2, hidden=32, layers=2):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, num_labels=num_labels, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


FAMILIES = {
    "bert": (tiny_bert, ["query", "key", "value", "attention.output.dense"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc", "wte"]),
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "embed_tokens"]),
}


def logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def randomize_lora(model, scale=0.5, seed=7):
    """Give every LoRA B a non-zero value so adapters change outputs (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def perturb_trainable(model, seed):
    """Non-zero LoRA B and changed saved heads, so every part of an adapter moves the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def run_arch(model, arch):
    """The main output of ``model`` on the zoo architecture's inputs."""
    with torch.no_grad():
        return main_output(model(**arch.inputs()))


# --- data on disk --------------------------------------------------------------------------------
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("good great fine lovely superb bad awful poor dull boring the a film movie plot actor scene was is very "
         "quite not really positive negative review story").split()


def _word_tokenizer(extra_special=()):
    """A word-level tokenizer built in memory (no download): enough for shapes, masking and templates."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *extra_special]
    vocab = {token: i for i, token in enumerate(specials + WORDS + list(":?.,!"))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    return backend, len(vocab)


def review_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = ["good", "great", "superb", "lovely"] if label == "positive" else ["bad", "awful", "dull", "boring"]
        text = " ".join(rng.choice(["the film was", "a movie is", "the plot was", "the actor is"]).split()
                        + [rng.choice(["very", "quite", "really"]), rng.choice(words)])
        rows.append({"text": text, "label": label})
    return rows


# --- drivers -------------------------------------------------------------------------------------
TINY = ["--max-steps", "8", "--batch-size", "8", "--seq-len", "32", "--warmup-steps", "1", "--lr", "1e-2"]


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of ``lorakit ARGV``."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train_options(model, data, output, **kw):
    """Resolved TrainOptions for a tiny, quick run (classify unless ``task`` says otherwise)."""
    base = dict(model=model, data=data, output=str(output), task="classify", max_steps=6, batch_size=8, lr=5e-3,
                seq_len=32, warmup_steps=1, eval_steps=3)
    base.update(kw)
    return resolve_options(None, base)


def offline(causal_dir, adapter_dir, adapter, prompt, max_new_tokens=8, chat=False):
    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    model = AutoModelForCausalLM.from_pretrained(causal_dir).eval()
    if adapter != "base":
        lk.load_adapter(model, adapter_dir / adapter)
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def complete(url, model, prompt, **kw):
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


# --- serving engine drivers ---------------------------------------------------------------------
class Recorder:
    """A request's sink. ``events`` is shared by all requests: (request name, kind, time), where the
    kinds are the sink's ("delta", "done", "error") and "token" (one per generated token)."""

    def __init__(self, name, events):
        self.name, self.events, self.result, self.error = name, events, None, None
        self.finished = threading.Event()

    def __call__(self, kind, payload):
        self.events.append((self.name, kind, time.perf_counter()))
        self.result = payload if kind == "done" else self.result
        self.error = payload if kind == "error" else self.error
        if kind in ("done", "error"):
            self.finished.set()

    def times(self, kind):
        return [t for name, k, t in self.events if name == self.name and k == kind]


def submit(engine, name, adapter, prompt, max_tokens, events):
    recorder = Recorder(name, events)
    ids = engine.tokenizer(prompt)["input_ids"]
    name_or_base = engine.base_name if adapter == "base" else adapter
    engine.submit(Request("generate", engine.check_model(name_or_base), ids, recorder, max_new_tokens=max_tokens))
    return recorder


def answers_as_offline(engine, causal_dir, adapter_dir, jobs):
    """Queue ``jobs`` ((adapter or "base", prompt, max_tokens) each) at once, so that one turn
    admits them all whatever the threads' timing, and assert that every reply equals offline
    `generate` with its adapter."""
    recorders = [Recorder(f"r{i}", []) for i in range(len(jobs))]
    engine.submit_all([Request("generate", engine.check_model(engine.base_name if a == "base" else a),
                               engine.tokenizer(prompt)["input_ids"], recorder, max_new_tokens=n)
                       for recorder, (a, prompt, n) in zip(recorders, jobs)])
    for recorder, (adapter, prompt, n) in zip(recorders, jobs):
        assert recorder.finished.wait(60) and recorder.error is None, recorder.error
        assert recorder.result["text"] == offline(causal_dir, adapter_dir, adapter, prompt, max_new_tokens=n)


def make_engine(causal_dir, adapter_dir, **kw):
    """An engine over the tiny causal model with adapters alpha and beta loaded."""
    return build_engine(causal_dir, {"alpha": adapter_dir / "alpha", "beta": adapter_dir / "beta"},
                        limits=Limits(max_new_tokens=40, max_prompt_tokens=100), **kw)

"""DoRA → plain LoRA for vLLM (`lorakit export --format vllm`): the rank the truncated SVD needs for
a max output error ≤ 1e-3, on DoRA adapters trained here (issue 28).

    python -m benchmarks.vllm_export [--steps-smollm2 40] [--steps-minilm 80]

Trains a DoRA adapter (r=8, all-linear, batch 8 x 64 tokens) on SmolLM2-135M (sft, rotten-tomatoes) and on MiniLM
(classify, rotten-tomatoes); exports each at a sweep of ranks and at the default tolerance (1e-3
relative spectral error per module), loads the export onto a fresh base and compares with the DoRA
adapter on 32 test texts: SmolLM2's logits, MiniLM's encoder output (the classifier head is a module
trained in full, which vLLM does not load; it is left out of both sides). Results:
benchmarks/results/vllm_export.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

RANKS = (8, 16, 32, 64, 128, 256, 10**6)  # the last: every module at its full rank min(out, in)


def train_dora(model: str, task: str, steps: int, output: Path) -> Path:
    from lorakit.training.loop import train
    from lorakit.training.options import resolve_options

    train(resolve_options(None, dict(model=model, data="rotten-tomatoes", task=task, output=str(output),
                                     max_steps=steps, seq_len=64, r=8, use_dora=True, overwrite=True, batch_size=8,
                                     eval_examples=64)), quiet=True)
    return output / "adapter"


def without_saved_modules(adapter: Path, target: Path) -> Path:
    """The adapter with its fully trained modules (a classifier head) left out."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config["modules_to_save"] = None
    config["task_type"] = None  # PEFT adds a SEQ_CLS model's head to the saved modules
    (target / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(target / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".modules_to_save." not in k and "classifier" not in k},
              target / "adapter_model.safetensors")
    return target


def outputs(name: str, task: str, adapter: Path, texts: list[str]) -> torch.Tensor:
    import lorakit as lk
    from lorakit.hub.models import load_model

    model, tokenizer = load_model(name, "sft" if task == "sft" else "classify", ["neg", "pos"])
    lk.load_adapter(model, adapter)
    model.eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        if task == "sft":
            return model(**batch).logits[batch["attention_mask"].bool()]
        return model.base_model.bert(**batch).last_hidden_state[batch["attention_mask"].bool()] \
            if hasattr(model, "base_model") and hasattr(model.base_model, "bert") else \
            model.bert(**batch).last_hidden_state[batch["attention_mask"].bool()]


def sweep(name: str, task: str, steps: int, work: Path, texts: list[str]) -> dict:
    from lorakit.hub.models import resolve_model_path
    from lorakit.io.vllm_export import export_vllm

    adapter = train_dora(name, task, steps, work / f"{name}-run")
    if task == "classify":
        adapter = without_saved_modules(adapter, work / f"{name}-encoder-adapter")
    base = resolve_model_path(name)
    reference = outputs(name, task, adapter, texts)
    scale = float(reference.abs().max())
    rows = []
    for rank in (*RANKS, None):
        target = work / f"{name}-vllm-{rank or 'tol'}"
        result = export_vllm(adapter, target, base, rank=rank)
        error = float((outputs(name, task, target, texts) - reference).abs().max())
        by = "tolerance 1e-3" if rank is None else ("full rank" if rank == 10**6 else "fixed")
        rows.append({"rank": result["r"], "by": by,
                     "max_output_error": error, "relative_output_error": error / scale,
                     "max_relative_spectral_error": result["max_relative_spectral_error"]})
        print(f"{name}: rank {result['r']:4d} ({rows[-1]['by']}): max |Δ output| {error:.2e} "
              f"(output scale {scale:.1f}), worst module spectral error {result['max_relative_spectral_error']:.2e}",
              flush=True)
    needed = min((row["rank"] for row in rows if row["max_output_error"] <= 1e-3), default=None)
    return {"model": name, "task": task, "train_steps": steps, "output": "logits" if task == "sft" else "encoder",
            "output_scale": scale, "rows": rows, "rank_for_1e-3": needed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-smollm2", type=int, default=40)
    parser.add_argument("--steps-minilm", type=int, default=80)
    parser.add_argument("--out", default="benchmarks/results/vllm_export.json")
    args = parser.parse_args()
    from lorakit.cli import quiet_libraries
    from lorakit.training.data import load_splits

    quiet_libraries()
    texts = [row["text"] for row in load_splits("rotten-tomatoes", 0)["test"][:32]]
    with tempfile.TemporaryDirectory() as folder:
        results = [sweep("minilm", "classify", args.steps_minilm, Path(folder), texts),
                   sweep("smollm2-135m", "sft", args.steps_smollm2, Path(folder), texts)]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for result in results:
        print(f"{result['model']}: rank for max output error <= 1e-3: {result['rank_for_1e-3']}")


if __name__ == "__main__":
    main()

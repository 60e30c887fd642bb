"""Streaming merge vs in-memory merge: peak memory on a multi-GB sharded checkpoint, and equal outputs.

    python -m benchmarks.streaming_merge [--hidden 2048 --layers 10 --shard-mb 200]

A random-init Llama (fp32, about 2.1 GB at the defaults) is saved as >= 10 safetensors shards with
a LoRA adapter (r=16 on the seven projections). Each merge runs in a fresh process; the figure is its
peak RSS above its RSS after importing torch, transformers and lorakit:
  streaming  `lorakit merge ADAPTER --base BASE` (lorakit/io/streaming_merge.py): one shard at a time
  in-memory  load the base with transformers, lk.load_adapter, lk.unload(merge=True), save_pretrained
Then both outputs are compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
import torch, transformers
import lorakit as lk  # library code imported before the baseline: only the merge's own memory counts
from lorakit.io.streaming_merge import stream_merge
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
mode, adapter, base, out = sys.argv[1:5]
before = status("VmRSS")
if mode == "streaming":
    stream_merge(adapter, base, out)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    lk.load_adapter(model, adapter)
    lk.unload(model, merge=True).save_pretrained(out)
print(json.dumps({"peak": status("VmHWM") - before}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--shard-mb", type=int, default=200)
    args = parser.parse_args()
    import torch
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit as lk

    from .common import SEVEN

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                             num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
                             tie_word_embeddings=False)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0, 0.02)
        model.save_pretrained(work / "base", max_shard_size=f"{args.shard_mb}MB")
        lk.inject(model, lk.LoraConfig(r=16, lora_alpha=32, target_modules=SEVEN))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
        lk.save_adapter(model, work / "adapter")
        del model
        shards = sorted((work / "base").glob("*.safetensors"))
        total = sum(f.stat().st_size for f in shards)
        largest = max(f.stat().st_size for f in shards)
        adapter = (work / "adapter" / "adapter_model.safetensors").stat().st_size
        peaks = {}
        for mode in ("streaming", "in-memory"):
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(work / "adapter"), str(work / "base"),
                                  str(work / mode)], capture_output=True, text=True, check=True)
            peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
        differing = 0
        streamed_files = sorted((work / "streaming").glob("*.safetensors"))
        memory_files = sorted((work / "in-memory").glob("*.safetensors"))
        memory_tensors = {}
        for file in memory_files:
            with safe_open(file, "pt") as handle:
                memory_tensors.update({k: file for k in handle.keys()})
        for file in streamed_files:
            with safe_open(file, "pt") as handle:
                for key in handle.keys():
                    with safe_open(memory_tensors[key], "pt") as other:
                        differing += not torch.equal(handle.get_tensor(key), other.get_tensor(key))
    bound = largest + adapter
    print(f"checkpoint: {len(shards)} shards, {total / 1e9:.2f} GB; largest shard {largest / 1e6:.0f} MB; "
          f"adapter {adapter / 1e6:.1f} MB")
    for mode, peak in peaks.items():
        print(f"{mode:>10}: peak RSS growth {peak / 1e6:,.0f} MB = {peak / bound:.2f}x (largest shard + adapter), "
              f"{peak / total:.2f}x the checkpoint")
    print(f"tensors differing between the two outputs: {differing}")


if __name__ == "__main__":
    main()

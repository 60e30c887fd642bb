"""A LLaMA-7B-shaped model on this box (issue 27): load, QLoRA-train, merge and generate, each step in
its own process with its peak resident memory.

    python -m benchmarks.seven_b [--work DIR] [--keep] [--steps load,train,merge,generate]

The checkpoint is random (weights do not matter for memory or time), built from a config without
instantiating the model: hidden 4096, 32 layers, 32 heads, intermediate 11008, as `lorakit estimate
--preset llama-7b`, with SmolLM2's tokenizer and vocabulary (49152) so that the CLI can train on
and generate text; bf16 safetensors in ~2 GB shards (~13.8 GB). Steps:
  load      `load_model(..., quantize=bf16)`: QLoRA's base straight into 4 bits;
  train     `lorakit train --qlora --bf16 --grad-checkpointing`, r=8 on q,k,v,o, batch 1 x 256 tokens
            (hamlet, packed), 3 steps; its peak next to `lorakit estimate`'s for the same run;
  fsdp      the same run under `torchrun --nproc_per_node 2 ... --fsdp`, 1 step: the peak per process;
  merge     `lorakit merge RUN/adapter --base CKPT --dtype bf16`: the streaming merge;
  generate  `lorakit generate --model MERGED --dtype bf16` and `lorakit generate RUN` (4-bit + adapter).
Peaks are each child's ru_maxrss (os.wait4). The work directory (~28 GB) is deleted unless --keep.
Results: benchmarks/results/seven_b.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9
SHARD_BYTES = 2 * 10**9
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_checkpoint(directory: Path) -> dict:
    """Random bf16 tensors of a LLaMA-7B-shaped model, shard by shard (one shard in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from lorakit.hub.models import resolve_model_path

    smollm = resolve_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(smollm)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, str(directory / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0
    for key, shape in shapes.items():
        nbytes = shape.numel() * 2
        if size + nbytes > SHARD_BYTES:
            flush()
        tensor = torch.ones(shape, dtype=torch.bfloat16) if key.endswith("norm.weight") else \
            (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        current[key], size = tensor, size + nbytes
    flush()
    total = len(shards)
    weight_map = {}
    for i, (name, keys) in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        (directory / name).rename(directory / final)
        weight_map.update({key: final for key in keys})
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(s.numel() * 2 for s in shapes.values())}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    files = sorted(directory.glob("*.safetensors"))
    return {"params": sum(s.numel() for s in shapes.values()), "shards": len(files),
            "bytes": sum(f.stat().st_size for f in files), "largest_shard": max(f.stat().st_size for f in files)}


def high_water(pids: list[int]) -> dict[int, int]:
    """VmHWM (peak resident bytes of the process's own memory since its exec) of each live pid."""
    marks = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as handle:
                marks[pid] = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            pass
    return marks


def descendants(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in children] + [d for c in children for d in descendants(int(c))]


def measured(command: list[str], log: Path) -> dict:
    """Run ``command``; its wall time, exit code and peak resident memory: each process's VmHWM,
    polled while it runs (ru_maxrss would not do: a child forked from this process inherits this
    process's high-water mark). For a launcher (torchrun) the largest of its workers' peaks."""
    start = time.perf_counter()
    marks: dict[int, int] = {}
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while child.poll() is None:
            marks.update({pid: max(mark, marks.get(pid, 0))
                          for pid, mark in high_water([child.pid, *descendants(child.pid)]).items()})
            time.sleep(0.2)
    workers = {pid: mark for pid, mark in marks.items() if pid != child.pid} or marks
    result = {"command": " ".join(command), "seconds": round(time.perf_counter() - start, 1),
              "exit": child.returncode, "peak_gb": round(max(workers.values(), default=0) / GB, 2),
              "processes": len(workers)}
    print(f"  {result['seconds']:>7.1f} s  peak {result['peak_gb']:.2f} GB  exit {result['exit']}: {result['command']}",
          flush=True)
    if result["exit"] != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
    return result


def json_tail(log: Path) -> dict:
    text = log.read_text()
    return json.loads(text[text.index("\n{") + 1:] if "\n{" in text else text[text.index("{"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="work directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--steps", default="load,train,fsdp,merge,generate")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/seven_b.json"))
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="seven-b-", dir=os.environ.get("TMPDIR", "/tmp")))
    steps = args.steps.split(",")
    ckpt, run, merged = work / "llama-7b-bf16", work / "run", work / "merged-bf16"
    py, lorakit = sys.executable, [sys.executable, "-m", "lorakit"]
    # earlier steps' results are kept, so steps can be run (again) one at a time
    results: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}
    try:
        if not (ckpt / "config.json").is_file():
            start = time.perf_counter()
            results["checkpoint"] = build_checkpoint(ckpt)
            results["checkpoint"]["build_seconds"] = round(time.perf_counter() - start, 1)
        else:
            files = sorted(ckpt.glob("*.safetensors"))
            results["checkpoint"] = {"shards": len(files), "bytes": sum(f.stat().st_size for f in files),
                                     "largest_shard": max(f.stat().st_size for f in files)}
        checkpoint_gb = results["checkpoint"]["bytes"] / GB
        print(f"checkpoint: {checkpoint_gb:.1f} GB in {results['checkpoint']['shards']} shards at {ckpt}", flush=True)
        if "load" in steps:
            load = ("import time, torch; from lorakit.hub.models import load_model; t = time.perf_counter(); "
                    f"m, _ = load_model({str(ckpt)!r}, 'lm', quantize=torch.bfloat16, dtype=torch.bfloat16); "
                    "print('load seconds', round(time.perf_counter() - t, 1))")
            results["qlora_load"] = measured([py, "-c", load], work / "load.log")
            results["qlora_load"]["vs_checkpoint"] = round(results["qlora_load"]["peak_gb"] / checkpoint_gb, 3)
        train = [*lorakit, "train", "--model", str(ckpt), "--data", "hamlet", "--task", "lm", "--packing",
                 "--seq-len", "256", "--batch-size", "1", "--qlora", "--bf16", "--grad-checkpointing", "--r", "8",
                 "--targets", *TARGETS, "--max-steps", "3", "--warmup-steps", "1", "--eval-examples", "1",
                 "--output", str(run), "--overwrite", "--json"]
        if "train" in steps:
            results["qlora_train"] = measured(train, work / "train.log")
            estimate = [*lorakit, "estimate", "--model", str(ckpt), "--r", "8", "--targets", *TARGETS, "--qlora",
                        "--dtype", "bf16", "--batch-size", "1", "--seq-len", "256", "--grad-checkpointing",
                        "--chunked-loss", "--json"]
            results["estimate"] = measured(estimate, work / "estimate.log")
            rows = json_tail(work / "estimate.log")["memory"]
            qlora = next(row for row in rows if row["method"] == "qlora")
            results["estimate"]["qlora_total_gb"] = round(qlora["total"] / GB, 2)
            if results["qlora_train"]["exit"] == 0:
                summary = json.loads((run / "summary.json").read_text())
                results["qlora_train"]["losses"] = [r["loss"] for r in map(json.loads, (run / "train_log.jsonl")
                                                    .read_text().splitlines()) if "loss" in r]
                memory = summary["memory"]
                results["qlora_train"]["run_memory_gb"] = {k: round(v / GB, 2) for k, v in memory.items() if v}
                results["qlora_train"]["seconds_per_step"] = round(summary["train_seconds"] / summary["steps"], 1)
            results["qlora_train"]["peak_vs_estimate"] = round(results["qlora_train"]["peak_gb"]
                                                               / results["estimate"]["qlora_total_gb"], 3)
        if "fsdp" in steps:  # each process builds the model on meta and reads only its own shards
            fsdp = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lorakit",
                    *train[3:], "--fsdp"]
            fsdp[fsdp.index("--max-steps") + 1] = "1"
            del fsdp[fsdp.index("--r"):fsdp.index("--r") + 2]  # torchrun reads "--r" as its own --rdzv-*; 8 is the default
            fsdp[fsdp.index("--output") + 1] = str(work / "run-fsdp")
            results["fsdp_qlora"] = measured(fsdp, work / "fsdp.log")
            if results["fsdp_qlora"]["exit"] == 0:  # rank 0's own account: the load (setup) peak, the shards held
                memory = json.loads((work / "run-fsdp" / "summary.json").read_text())["memory"]
                results["fsdp_qlora"]["rank0_memory_gb"] = {k: round(v / GB, 2) for k, v in memory.items() if v}
            if "qlora_load" in results:
                results["fsdp_qlora"]["vs_one_process_load"] = round(results["fsdp_qlora"]["peak_gb"]
                                                                     / results["qlora_load"]["peak_gb"], 3)
        if "merge" in steps:
            results["merge"] = measured([*lorakit, "merge", str(run / "adapter"), "--base", str(ckpt), "--output",
                                         str(merged), "--dtype", "bf16", "--overwrite", "--json"], work / "merge.log")
            adapter_gb = sum(f.stat().st_size for f in (run / "adapter").glob("*.safetensors")) / GB
            bound = results["checkpoint"]["largest_shard"] / GB + adapter_gb
            results["merge"]["vs_largest_shard_plus_adapter"] = round(results["merge"]["peak_gb"] / bound, 3)
        if "generate" in steps:
            prompt = ["--prompt", "To be, or not to be", "--max-new-tokens", "8", "--json"]
            results["generate_merged_bf16"] = measured([*lorakit, "generate", "--model", str(merged), "--dtype", "bf16",
                                                        *prompt], work / "generate_merged.log")
            results["generate_4bit_adapter"] = measured([*lorakit, "generate", str(run), *prompt],
                                                        work / "generate_4bit.log")
            for key, log in (("generate_merged_bf16", "generate_merged.log"), ("generate_4bit_adapter", "generate_4bit.log")):
                if results[key]["exit"] == 0:
                    results[key]["reply"] = json_tail(work / log).get("reply")
    finally:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Reliability figures (issue 23): kill -9 at every file-system step of save / checkpoint / merge /
export (is the target all old or all new after each kill?), a disconnect storm (tokens generated for
clients that left), and a body flood (the server's peak memory).

    python -m benchmarks.reliability [--json]

Kill points: a forked writer SIGKILLs itself just before its N-th call of any file-system step
(rename, exchange, link, unlink, rmtree, copy, mkdtemp/mkstemp, safetensors/torch writes), for
N = 1, 2, ... until a write completes; after each kill the target is fingerprinted (a hash of
every file) and compared with an uninterrupted old and new write.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import lorakit as lk

STEPS = [("os", "replace"), ("os", "rename"), ("os", "link"), ("os", "unlink"), ("os", "remove"),
         ("shutil", "rmtree"), ("shutil", "copyfile"), ("shutil", "copy2"), ("tempfile", "mkdtemp"),
         ("tempfile", "mkstemp"), ("lorakit.io.atomic", "exchange"), ("lorakit.io.checkpoint", "save_file"),
         ("lorakit.training.checkpointing", "save_file"), ("torch", "save")]


def fingerprint(path: Path):
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {str(f.relative_to(path)): _file_print(f) for f in sorted(path.rglob("*")) if f.is_file()}


def _file_print(file: Path) -> str:
    if file.suffix == ".pt":  # torch.save writes a random serialization id: compare what it holds
        try:
            state = torch.load(file, weights_only=False)
        except Exception:  # noqa: BLE001 - a torn file
            return "unreadable"
        return hashlib.sha256(repr(state["optimizer"]["param_groups"]).encode()).hexdigest()
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _arm(stop_at: int) -> None:
    import importlib

    calls = [0]
    for module_name, name in STEPS:
        module = importlib.import_module(module_name)
        original = getattr(module, name, None)
        if original is None:
            continue

        def step(*args, __original=original, **kwargs):
            calls[0] += 1
            if calls[0] == stop_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return __original(*args, **kwargs)
        setattr(module, name, step)


def kill_points(write_old, write_new, target: Path) -> dict:
    """Kill the new write at every step; count outcomes that are all old, all new, or anything else."""
    scratch = Path(tempfile.mkdtemp())
    write_old(target)
    old = fingerprint(target)
    write_new(scratch / target.name)
    new = fingerprint(scratch / target.name)
    shutil.rmtree(scratch)
    counts = {"kills": 0, "old": 0, "new": 0, "broken": 0}
    for point in range(1, 500):
        write_old(target)
        child = os.fork()
        if child == 0:
            _arm(point)
            write_new(target)
            os._exit(0)
        _, status = os.waitpid(child, 0)
        state = fingerprint(target)
        outcome = "old" if state == old else "new" if state == new else "broken"
        counts[outcome] += 1
        if not os.WIFSIGNALED(status):
            counts["completed_after_steps"] = point - 1
            break
        counts["kills"] += 1
    write_new(target)  # the next write sweeps what killed writers left beside the target
    counts["leftovers_after_next_write"] = sorted(p.name for p in target.parent.iterdir() if p.name != target.name)
    return counts


def tiny_llama_dir(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    return root / "base"


def adapter_of(base: Path, alpha: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(alpha / 1000)
    return model


def all_kill_points(root: Path) -> dict:
    from lorakit.io.gguf import export_gguf
    from lorakit.io.streaming_merge import stream_merge
    from lorakit.training.checkpointing import save_checkpoint

    base = tiny_llama_dir(root)
    old, new = adapter_of(base, 16), adapter_of(base, 64)
    lk.save_adapter(old, root / "src_old")
    lk.save_adapter(new, root / "src_new")

    def save(model):
        def write(target):
            lk.save_adapter(model, target)
            (target / "tokenizer.json").write_text("{}")  # a run's adapter dir holds other files too
        return write

    def checkpoint(model):
        def write(target):
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            state = {n: p for n, p in model.named_parameters() if p.requires_grad}
            optimizer.param_groups[0]["lr"] = \
                float(next(p for n, p in state.items() if "lora_B" in n).detach().flatten()[0])  # tells old from new
            save_checkpoint(target.parent, state, optimizer.state_dict(), scheduler, {"step": 1}, name=target.name)
        return write

    def merge(source):
        return lambda target: stream_merge(source, base, target, overwrite=True)

    def export(source):
        return lambda target: export_gguf(source, base, target)

    return {
        "save_adapter over an adapter": kill_points(save(old), save(new), root / "save" / "adapter"),
        "train checkpoint over a checkpoint": kill_points(checkpoint(old), checkpoint(new), root / "ckpt" / "checkpoint"),
        "streaming merge over a merged model": kill_points(merge(root / "src_old"), merge(root / "src_new"),
                                                           root / "merge" / "merged"),
        "GGUF export over an export": kill_points(export(root / "src_old"), export(root / "src_new"),
                                                  root / "export" / "adapter.gguf"),
    }


def disconnect_storm(root: Path, clients: int = 50, max_tokens: int = 100) -> dict:
    import httpx

    from lorakit.serving import BackgroundServer, Limits

    base = root / "base" if (root / "base").exists() else tiny_llama_dir(root)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0", eos_token="w1").save_pretrained(base)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.serving.engine import Engine

    model = AutoModelForCausalLM.from_pretrained(base)
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))  # a bigger model's pace

    eos = sorted({1, model.generation_config.eos_token_id})  # the tokenizer's and the model config's

    def no_eos(module, args, output):  # every request runs to max_tokens unless something stops it
        output.logits[..., eos] = -1e9
        return output
    model.register_forward_hook(no_eos)
    engine = Engine(model, AutoTokenizer.from_pretrained(base),
                    limits=Limits(max_new_tokens=max_tokens, max_prompt_tokens=16, max_batch=64))
    with BackgroundServer(engine) as server:
        def leave_after_first_chunk(i):
            body = {"model": engine.base_name, "prompt": f"w{2 + i % 100} w5", "max_tokens": max_tokens,
                    "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as reply:
                next(reply.iter_lines())
        threads = [threading.Thread(target=leave_after_first_chunk, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        left_at = engine.prometheus.generated_tokens._value.get()
        time.sleep(1.0)
        after = engine.prometheus.generated_tokens._value.get()
        return {"clients": clients, "max_tokens": max_tokens, "tokens_generated_in_all": int(after),
                "tokens_if_nobody_stopped": clients * max_tokens,
                "tokens_generated_after_the_last_client_left": int(after - left_at),
                "cancelled": engine.stats["cancelled"], "failed": engine.stats["failed"],
                "finished": engine.stats["requests"] - engine.stats["cancelled"] - engine.stats["failed"],
                "running_after": engine.prometheus.running._value.get()}


def body_flood(root: Path, megabytes: int = 300) -> dict:
    base = root / "base"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(base), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def peak_kib():
        status = Path(f"/proc/{server.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        before = peak_kib()
        sent, answer = 0, b""
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (1 << 20, b"x" * (1 << 20))
            try:
                for _ in range(megabytes):
                    sock.sendall(chunk)
                    sent += 1
                sock.sendall(b"0\r\n\r\n")
                answer = sock.recv(200)
            except OSError:
                pass
        time.sleep(0.5)
        return {"sent_mb": sent, "answer": answer.split(b"\r\n", 1)[0].decode(errors="replace"),
                "peak_rss_before_mb": round(before / 1024, 1), "peak_rss_after_mb": round(peak_kib() / 1024, 1)}
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lorakit-reliability-"))
    result = {"kill_points": all_kill_points(root), "disconnect_storm": disconnect_storm(root),
              "body_flood": body_flood(root)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name, counts in result["kill_points"].items():
        whole = counts["old"] + counts["new"]
        print(f"kill -9 at {counts['kills']} points of {name}: {whole} of {whole + counts['broken']} outcomes all old "
              f"or all new, {counts['broken']} broken; leftovers after the next write: "
              f"{counts['leftovers_after_next_write'] or 'none'}")
    storm = result["disconnect_storm"]
    print(f"disconnect storm: {storm['clients']} streaming clients left after their first chunk: "
          f"{storm['tokens_generated_in_all']} tokens generated in all (of {storm['tokens_if_nobody_stopped']} asked), "
          f"{storm['tokens_generated_after_the_last_client_left']} after the last one left; "
          f"{storm['cancelled']} cancelled")
    flood = result["body_flood"]
    print(f"body flood: {flood['sent_mb']} MB chunked body sent, answer {flood['answer']!r}; server peak RSS "
          f"{flood['peak_rss_before_mb']} MB before, {flood['peak_rss_after_mb']} MB after")
    (Path(__file__).parent / "results" / "reliability.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

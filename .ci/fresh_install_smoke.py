"""Run inside a venv that holds only README command one's install (no test extras): every command
of the product must work there. Generates with the embedded SmolLM2 (the GGUF read needs the core
dependencies alone), trains 2 SFT steps (and one QLoRA + LoftQ step with an added token, generated
from), and serves one chat request over HTTP on loopback."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

work = Path(tempfile.mkdtemp(prefix="lorakit-smoke-"))
env = {**os.environ, "LORAKIT_CACHE": str(work / "cache"), "TQDM_DISABLE": "1"}  # a fresh GGUF conversion
lorakit = [sys.executable, "-m", "lorakit"]


def step(*argv: str) -> str:
    print("+ lorakit", " ".join(argv), flush=True)
    done = subprocess.run([*lorakit, *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"FAILED ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


reply = json.loads(step("generate", "--model", "smollm2-135m", "--chat", "--prompt", "Say hi.", "--max-new-tokens", "4",
                        "--json").strip().splitlines()[-1])
assert reply["reply"].strip(), reply
step("train", "--model", "smollm2-135m", "--data", "rotten-tomatoes", "--task", "sft", "--max-steps", "2",
     "--batch-size", "2", "--seq-len", "96", "--eval-examples", "2", "--output", str(work / "sft"))
assert (work / "sft" / "adapter" / "adapter_model.safetensors").is_file()
# this round's training options need nothing beyond the core either: QLoRA + LoftQ (lorakit's own NF4)
# and new tokens, loaded back by generate (the base resized to the run's tokenizer)
step("train", "--model", "smollm2-135m", "--data", "rotten-tomatoes", "--task", "sft", "--max-steps", "1",
     "--batch-size", "2", "--seq-len", "96", "--eval-examples", "2", "--qlora", "--init", "loftq",
     "--add-tokens", "<|tool|>", "--output", str(work / "loftq"))
step("generate", str(work / "loftq"), "--prompt", "Review: a fine film", "--max-new-tokens", "2")

with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
print(f"+ lorakit serve --model smollm2-135m --adapter sft=... --port {port}", flush=True)
server = subprocess.Popen([*lorakit, "serve", "--model", "smollm2-135m", "--adapter", f"sft={work / 'sft' / 'adapter'}",
                           "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
try:
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except OSError:
            if server.poll() is not None:
                sys.exit(f"FAILED: the server exited:\n{server.stdout.read()[-3000:]}")
            time.sleep(0.5)
    body = json.dumps({"model": "sft", "messages": [{"role": "user", "content": "Is 'a fine film' positive?"}],
                       "max_tokens": 4, "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
    assert answer["choices"][0]["message"]["content"] is not None, answer
    print("served:", answer["choices"][0]["message"]["content"][:60])
finally:
    server.terminate()
    server.wait(30)
print("fresh-install smoke: generate, sft train (also qlora + loftq + added tokens) and serve all ran with command one's install alone")

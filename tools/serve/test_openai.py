"""`bitnet serve` against the official `openai` Python client, on 127.0.0.1.

Chat (streaming and not) must give the text of `bitnet generate --chat --temperature 0`, and 16
concurrent greedy completion streams must each give the text of `bitnet generate --temperature 0`
for the same prompt (batch invariance end to end: the server decodes them together, in slots that
join and leave mid-flight). Then SIGTERM: the server must exit 0.

usage: test_openai.py BITNET_BINARY [--device cpu|gpu] [--parallel N]
"""

import argparse
import concurrent.futures
import json
import signal
import subprocess
import sys
import time
import urllib.request

from openai import OpenAI

PROMPTS = [
    "Once upon a time",
    "The little dog",
    "She looked at the big red ball and said",
    "Tom",
    "In the morning, the sun was shining and the birds",
    "Lily and Ben went to the park",
    "One day, a cat",
    "The boy was sad because",
    "Mom said",
    "There was a big tree",
    "The bird flew",
    "Sam wanted to play with",
    "It was a cold day",
    "The girl found a box",
    "A fish lived in",
    "They all laughed and",
]
MAX_TOKENS = 24


def generate(binary, device, prompt, chat=False, system=None):
    cmd = [binary, "generate", "--device", device, "--temperature", "0", "-n", str(MAX_TOKENS),
           "--json", "--prompt", prompt]
    if chat:
        cmd.append("--chat")
    if system:
        cmd += ["--system", system]
    out = subprocess.run(cmd, capture_output=True, check=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["text"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parallel", type=int, default=8)
    a = ap.parse_args()

    t0 = time.time()
    want = [generate(a.binary, a.device, p) for p in PROMPTS]
    want_chat = generate(a.binary, a.device, "Tell me a story.", chat=True, system="Be brief.")

    server = subprocess.Popen(
        [a.binary, "serve", "--device", a.device, "--port", "0", "--parallel", str(a.parallel),
         "--ctx", "256", "--step-tokens", "32"],
        stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip().removeprefix("listening on ")
        assert url.startswith("http://127.0.0.1:"), url
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/health") as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            raise SystemExit("the server never became ready")

        client = OpenAI(base_url=url + "/v1", api_key="unused")
        models = client.models.list()
        model = models.data[0].id

        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Tell me a story."}]
        r = client.chat.completions.create(model=model, messages=messages,
                                           max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].message.content == want_chat, (r.choices[0].message.content, want_chat)
        assert r.usage.completion_tokens > 0
        assert r.choices[0].finish_reason in ("stop", "length")

        stream = client.chat.completions.create(model=model, messages=messages,
                                                max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        text, usage = "", None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.delta.content or ""
        assert text == want_chat, (text, want_chat)
        assert usage is not None and usage.completion_tokens == r.usage.completion_tokens

        def complete(prompt):
            s = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                          temperature=0, stream=True)
            return "".join(c.choices[0].text for c in s if c.choices)

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(complete, PROMPTS))
        for p, g, w in zip(PROMPTS, got, want):
            assert g == w, f"prompt {p!r}: server {g!r} != generate {w!r}"

        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        assert code == 0, f"exit status {code}"
    finally:
        if server.poll() is None:
            server.kill()
    print(f"openai client test ({a.device}, --parallel {a.parallel}): chat, chat stream and "
          f"{len(PROMPTS)} concurrent greedy streams equal bitnet generate "
          f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())

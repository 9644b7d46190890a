"""serving.py + openai_api.py + scripts/serve.py: the OpenAI-compatible server, driven by the official client.

One tiny SFT run (so it has a chat template) and one Decoder of 2 slots shared by every server here
(servers on the same Decoder reuse its compiled prefill/steps). Prompts stay within 8 tokens: one
prefill shape to compile.
"""

import contextlib
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn
from conftest import tiny_config

import openai_api
import overrides
import serving
import train
from configs import sft as sft_config
from data import chat
from model import decode
from model.sampling import GREEDY, Sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOTS, CONTEXT = 2, 1024


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny SFT run ('say abc' -> 'abc abc abc.'), 20 steps: enough for varied, mostly ASCII text."""
    d = tmp_path_factory.mktemp("serve")
    rng = random.Random(0)
    for name, n in (("train.jsonl", 300), ("val.jsonl", 16)):
        with open(d / name, "w") as f:
            for _ in range(n):
                w = "".join(rng.choice("abcdef") for _ in range(3))
                f.write(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                 {"role": "assistant", "content": f"{w} {w} {w}."}]}) + "\n")
    cfg = tiny_config(str(d / "train.jsonl"), sft_config, sft__val_path=str(d / "val.jsonl"), data__seq_len=64,
                      sft__eval_generate=0, train__steps=20, optim__lr=1e-2, train__eval_every=20,
                      train__checkpoint_every=20)
    train.train_and_evaluate(cfg, str(d / "run"))
    return serving.load_run(str(d / "run"))


@pytest.fixture(scope="module")
def decoder(run):
    return decode.Decoder(run.model, batch=SLOTS, cache_len=CONTEXT, n_top=20, chunk=4)


@contextlib.contextmanager
def serve(run, decoder, max_queue=32, **app_options):
    """An engine + app on a free loopback port, uvicorn in a background thread; yields (base url, engine)."""
    engine = serving.Engine(decoder, run.params, detokenize=run.tokenizer.decode, max_queue=max_queue).start()
    app = openai_api.make_app(engine, run.tokenizer, model_name=run.name, **{"chat": run.chat, **app_options})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()
        sock.close()


@pytest.fixture(scope="module")
def server(run, decoder):
    with serve(run, decoder, max_queue=32, max_body_bytes=4096) as s:
        yield s


def client(url, key="unused", **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)


def reference(run, decoder, prompt_ids, max_new, stop_ids, sampling=GREEDY, seed=0):
    """The library decoder's completion of one prompt (the same compiled functions as the engine's)."""
    return decoder.generate(run.params, [prompt_ids], max_new_tokens=max_new, sampling=sampling, seeds=[seed],
                            stop_ids=stop_ids, detokenize=run.tokenizer.decode, on_tokens=lambda i, ids: None)[0]


def health(url):
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def wait_for(url, predicate, timeout=20.0):
    deadline = time.time() + timeout
    while not predicate(stats := health(url)):
        assert time.time() < deadline, f"server state never changed as expected: {stats}"
        time.sleep(0.02)
    return stats


def raw_post(url, path, data: bytes, headers=None):
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_completion_and_chat_equal_the_library_decoder(server, run, decoder):
    url, _ = server
    tok, c = run.tokenizer, client(url)
    assert [m.id for m in c.models.list().data] == [run.name] and c.models.retrieve(run.name).id == run.name
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")

    out = c.completions.create(model=run.name, prompt="say abc", max_tokens=24, temperature=0, logprobs=3)
    want = reference(run, decoder, tok.encode("say abc"), 24, [tok.eos_id])
    choice = out.choices[0]
    assert choice.text == want.text and choice.finish_reason == want.finish_reason
    assert out.usage.prompt_tokens == 7 and out.usage.completion_tokens == len(want.tokens)
    assert out.usage.total_tokens == 7 + len(want.tokens)
    assert choice.logprobs.token_logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert choice.logprobs.tokens[0] == tok.decode(want.tokens[:1]) and choice.logprobs.text_offset[0] == 0
    assert all(len(t) == 3 for t in choice.logprobs.top_logprobs[:1])
    # the same prompt as token ids, and two prompts in one call
    ids = [int(x) for x in tok.encode("say abc")]
    both = c.completions.create(model=run.name, prompt=[ids, ids], max_tokens=24, temperature=0)
    assert [ch.text for ch in both.choices] == [want.text, want.text] and both.usage.prompt_tokens == 14

    messages = [{"role": "user", "content": "say a"}]
    out = c.chat.completions.create(model=run.name, messages=messages, max_tokens=30, temperature=0, logprobs=True,
                                    top_logprobs=2)
    end = tok.special_id(chat.END_TOKEN)
    want = reference(run, decoder, chat.render_prompt(messages, tok), 30, [end, tok.eos_id])
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason and out.usage.prompt_tokens == 8
    content = choice.logprobs.content
    assert [e.logprob for e in content] == pytest.approx(want.logprobs, abs=1e-5)
    assert all(len(e.top_logprobs) == 2 for e in content)
    if want.finish_reason == "stop":  # the stop token is reported by name, with no text
        assert content[-1].token == chat.END_TOKEN and want.tokens[-1] == end


def test_streamed_chunks_join_to_the_whole_text(server, run):
    url, _ = server
    c = client(url)
    whole = c.completions.create(model=run.name, prompt="say fed", max_tokens=40, temperature=0)
    chunks = list(c.completions.create(model=run.name, prompt="say fed", max_tokens=40, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert len(chunks) > 3 and all(ch.object == "text_completion" for ch in chunks)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "user", "content": "say b"}]
    whole = c.chat.completions.create(model=run.name, messages=messages, max_tokens=40, temperature=0)
    chunks = list(c.chat.completions.create(model=run.name, messages=messages, max_tokens=40, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].object == "chat.completion.chunk"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sixteen_concurrent_requests_each_get_their_own_text(server, run):
    """2 slots, 16 requests at once: queued, admitted as slots free, each text as when sent alone."""
    url, _ = server
    c = client(url)
    jobs = [dict(prompt=f"say {w}", temperature=0) for w in ("abc", "fed", "cab", "dd", "e", "fa", "bb", "ace")]
    jobs += [dict(prompt="say a", temperature=1.0, seed=seed) for seed in range(8)]

    def ask(job):
        return c.completions.create(model=run.name, max_tokens=20, **job).choices[0].text
    alone = [ask(job) for job in jobs]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, jobs))
    assert together == alone
    assert len(set(alone)) >= 8, f"too few distinct texts to tell requests apart: {alone}"
    assert health(url)["busy"] == 0


def test_same_seed_same_text_and_n_choices(server, run, decoder):
    url, _ = server
    c = client(url)
    kw = dict(model=run.name, prompt="say e", max_tokens=20, temperature=1.0, top_p=0.9)
    two = c.completions.create(n=2, seed=11, **kw)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.choices[0].text == c.completions.create(seed=11, **kw).choices[0].text
    assert two.choices[1].text == c.completions.create(seed=12, **kw).choices[0].text
    assert two.choices[0].text != two.choices[1].text
    want = reference(run, decoder, run.tokenizer.encode("say e"), 20, [run.tokenizer.eos_id],
                     Sampling(temperature=1.0, top_p=0.9), seed=12)
    assert two.choices[1].text == want.text


def test_stop_string_cuts_the_text(server, run):
    url, _ = server
    c = client(url)
    kw = dict(model=run.name, prompt="say cab", max_tokens=40, temperature=1.0, seed=3)
    full = c.completions.create(**kw).choices[0].text
    # 5 characters: longer than a decode chunk (4 tokens), so the stream must hold back a partial match
    k = next(k for k in range(3, len(full) - 5) if full.find(full[k:k + 5]) == k and "\ufffd" not in full[k:k + 5])
    stop = full[k:k + 5]
    cut = c.completions.create(stop=[stop, "never-there"], **kw)
    assert cut.choices[0].text == full[:k] and cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(stop=stop, stream=True, **kw)
    assert "".join(ch.choices[0].text for ch in streamed) == full[:k]


def test_bad_requests_get_openai_errors(server, run):
    url, _ = server
    c = client(url)
    status, body = raw_post(url, "/v1/completions", b'{"prompt": "hi", ')
    assert status == 400 and body["error"]["code"] == "invalid_json" and set(body["error"]) == {
        "message", "type", "param", "code"}
    status, body = raw_post(url, "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": "ten"}).encode())
    assert status == 400 and body["error"]["param"] == "max_tokens" and '"ten"' in body["error"]["message"]
    status, body = raw_post(url, "/v1/chat/completions", json.dumps({"messages": "hi"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = raw_post(url, "/v1/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match=r"5 \+ 1020 = 1025 > the context of 1024"):
        c.completions.create(model=run.name, prompt="hello", max_tokens=1020)
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        c.completions.create(model=run.name, prompt="", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature=-1"):
        c.completions.create(model=run.name, prompt="hi", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="'gpt-4' not found"):
        c.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.APIStatusError, match="exceeds the limit of 4096 bytes") as e:
        c.completions.create(model=run.name, prompt="x" * 5000)
    assert e.value.status_code == 413
    status, body = raw_post(url, "/v1/nothing", b"{}")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    # values the decoder cannot hold or that make its logits NaN are refused, naming the field; before,
    # a top_k past int32 failed inside the engine and took every request in flight down with it
    for field, text in (("top_k", "99999999999999"), ("frequency_penalty", "NaN"), ("presence_penalty", "Infinity"),
                        ("temperature", "Infinity")):
        status, body = raw_post(url, "/v1/completions", f'{{"prompt": "hi", "max_tokens": 2, "{field}": {text}}}'.encode())
        assert status == 400 and body["error"]["param"] == field, (field, body)
    for field, value in (("echo", True), ("logit_bias", {"1": 2}), ("response_format", {"type": "json_object"}),
                         ("best_of", 3)):  # what this server cannot do is refused, not silently ignored
        status, body = raw_post(url, "/v1/completions", json.dumps({"prompt": "hi", field: value}).encode())
        assert status == 400 and (body["error"]["param"], body["error"]["code"]) == (field, "unsupported")
    status, body = raw_post(url, "/v1/completions",
                            json.dumps({"prompt": "hi", "stream_options": {"include_usage": "yes"}}).encode())
    assert status == 400 and body["error"]["param"] == "stream_options.include_usage"
    status, body = raw_post(url, "/v1/completions", json.dumps({"prompt": "x" * 1020}).encode())
    assert status == 400 and body["error"]["param"] == "max_tokens"
    assert "max_tokens (not given: the default)=16" in body["error"]["message"]
    status, body = raw_post(url, "/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}')
    assert status == 400 and body["error"]["param"] == "prompt" and "not valid Unicode" in body["error"]["message"]
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    conn.request("GET", "/v1/completions")
    response = conn.getresponse()
    assert response.status == 405 and json.loads(response.read())["error"]["type"] == "invalid_request_error"
    assert health(url)["busy"] == 0


def test_completion_top_logprobs_keep_the_likelier_of_tokens_shown_alike():
    """Completions' top_logprobs is {token text: log-prob}: two bytes of partial UTF-8 characters both show as
    U+FFFD, and the key keeps the likelier one's value (the later, less likely one overwrote it)."""
    import openai_shapes
    from data.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    view = openai_shapes.TextView("m", tok, 3)
    a = int(tok.encode("A")[0])
    hi = [t for t in range(tok.vocab_size) if view.token_text(t) == "\ufffd"][:2]  # bytes >= 0x80 alone
    assert len(hi) == 2
    assert view._top([(hi[0], -1.0), (hi[1], -1.1), (a, -2.0)]) == {"\ufffd": -1.0, "A": -2.0}


def slow_down(monkeypatch, decoder, delay_s: float = 0.005):
    """`delay_s` more per decode call (4 tokens; 5 ms: a 1,000-token request then takes >= 1.25 s), so a
    test's client can leave, or overtake it, mid-request on any machine (this tiny model alone makes
    1,000 tokens in ~0.2 s)."""
    steps = decoder.steps

    def slow_steps(*args, **kwargs):
        time.sleep(delay_s)
        return steps(*args, **kwargs)
    monkeypatch.setattr(decoder, "steps", slow_steps)


def test_small_queue_429_key_401_disconnects_free_slots(run, decoder, monkeypatch):
    """Both slots busy with long streams, one request waiting, the next one is refused with 429;
    closing the streams (clients gone) frees both slots long before their 1,000 tokens."""
    # 20 ms a decode call: at most 200 tokens/s a slot, so the client's steps between starting the streams and
    # closing them may take 2.5 s before the two streams make the 1,000 tokens the check allows (at 5 ms: 0.6 s)
    slow_down(monkeypatch, decoder, delay_s=0.02)
    with serve(run, decoder, max_queue=1, api_key="sekret", chat=False) as (url, engine):
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").completions.create(model=run.name, prompt="hi")
        c = client(url, key="sekret")
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            c.chat.completions.create(model=run.name, messages=[{"role": "user", "content": "hi"}])
        assert health(url)["free"] == SLOTS  # /health needs no key

        before = engine.stats()["generated_tokens"]
        # one at a time: a stream's response starts before the engine admits it, so a second one started at once
        # can find the first still waiting and be refused by max_queue=1 (a fresh clone's suite did, under load)
        streams = []
        for _ in range(SLOTS):
            streams.append(c.completions.create(model=run.name, prompt="say a", max_tokens=1000, temperature=0,
                                                stream=True))
            next(iter(streams[-1]))  # its first token came: it holds a slot
        assert health(url)["busy"] == SLOTS
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(c.completions.create, model=run.name, prompt="say b", max_tokens=2)
            wait_for(url, lambda st: st["waiting"] == 1)
            with pytest.raises(openai.RateLimitError, match="max_queue=1"):
                c.completions.create(model=run.name, prompt="say c", max_tokens=2)
            for s in streams:
                s.close()
            assert waiting.result().usage.completion_tokens in (1, 2)  # it waited, then got its slot
        wait_for(url, lambda st: st["free"] == SLOTS and st["waiting"] == 0)
        assert engine.stats()["generated_tokens"] - before < SLOTS * 1000 / 2

        # a non-streamed request whose client times out frees its slot too
        before = engine.stats()["generated_tokens"]
        with pytest.raises(openai.APITimeoutError):
            client(url, key="sekret").with_options(timeout=0.3).completions.create(
                model=run.name, prompt="say a", max_tokens=1000, temperature=0)
        wait_for(url, lambda st: st["free"] == SLOTS)
        assert engine.stats()["generated_tokens"] - before < 1000


def test_continuous_batching_short_request_overtakes_a_long_one(server, run, decoder, monkeypatch):
    slow_down(monkeypatch, decoder)
    url, _ = server
    c = client(url)
    done = {}

    def long():
        text = "".join(ch.choices[0].text for ch in c.completions.create(
            model=run.name, prompt="say d", max_tokens=400, temperature=0, stream=True))
        done["long"] = time.time()
        return text
    with ThreadPoolExecutor(1) as pool:
        long_text = pool.submit(long)
        wait_for(url, lambda st: st["busy"] == 1)
        short = c.completions.create(model=run.name, prompt="say e", max_tokens=4, temperature=0)
        done["short"] = time.time()
        assert health(url)["busy"] == 1, "the long request should still be running"
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 4
        long_text.result()
    assert done["short"] < done["long"]


def test_bind_check_and_the_script_refuse_a_public_host_without_a_key(tmp_path):
    openai_api.check_bind("127.0.0.1", None, False)
    openai_api.check_bind("::1", None, False)
    openai_api.check_bind("localhost", None, False)
    openai_api.check_bind("0.0.0.0", "key", False)
    openai_api.check_bind("0.0.0.0", None, True)
    with pytest.raises(ValueError, match="--host=0.0.0.0 is reachable from other machines"):
        openai_api.check_bind("0.0.0.0", None, False)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        serving.load_run(str(tmp_path / "missing"))
    env = {k: v for k, v in os.environ.items() if k != "LMSTACK_API_KEY"}
    out = subprocess.run([sys.executable, "scripts/serve.py", f"--workdir={tmp_path}", "--host=0.0.0.0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [  # no usage text, no traceback
        "serve.py: error: --host=0.0.0.0 is reachable from other machines: give --api_key (or set LMSTACK_API_KEY), "
        "or --insecure to serve it without one", overrides.TRACEBACK_HINT]
    out = subprocess.run([sys.executable, "scripts/serve.py", f"--workdir={tmp_path}/missing"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"serve.py: error: workdir '{tmp_path}/missing' is not a directory", overrides.TRACEBACK_HINT]


def test_a_non_streamed_job_wakes_the_event_loop_once_per_choice():
    """The engine thread's updates of a non-streamed job reach the event loop in one hand-over per choice (its
    last update, with everything before it), in order; a streamed job's in one per update."""
    import asyncio

    class Engine:  # serving.Engine's submit/cancel, delivering from another thread as the engine does
        def submit(self, requests, deliver):
            def run():
                for step in range(5):
                    for r in requests:
                        last = step == 4
                        deliver(serving.Update(r.index, [step], [-0.5], None, f"{r.index}{step} ",
                                               "length" if last else None))
            threading.Thread(target=run).start()

        def cancel(self, requests):
            pass

    async def collect(stream: bool):
        loop = asyncio.get_running_loop()
        wakeups, original = [], loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakeups.append(1), original(*a))[1]
        reqs = [serving.Request(prompt=[1], max_new=5, sampling=GREEDY, seed=0, index=i) for i in range(2)]
        choices = await openai_api._Job(Engine(), reqs, stream=stream).collect()
        return [(c.tokens, c.text, c.finish_reason) for c in choices], len(wakeups)

    want = [([0, 1, 2, 3, 4], "".join(f"{i}{s} " for s in range(5)), "length") for i in range(2)]
    assert asyncio.run(collect(stream=False)) == (want, 2)
    assert asyncio.run(collect(stream=True)) == (want, 10)


def test_a_request_arriving_during_a_prefill_joins_the_same_decode_step(run, decoder):
    """A request that reaches the queue while the engine prefills others is admitted before the decode steps
    that follow (not a chunk later): a burst of HTTP requests arrives over milliseconds, not at once."""
    engine = None

    class Spy:  # the shared decoder, its prefill and steps observed
        def __init__(self):
            self.arrive_during_prefill, self.busy_at_steps = None, []

        def __getattr__(self, name):
            return getattr(decoder, name)

        def prefill(self, *args, **kwargs):
            if self.arrive_during_prefill is not None:
                arrive, self.arrive_during_prefill = self.arrive_during_prefill, None
                arrive()
            return decoder.prefill(*args, **kwargs)

        def steps(self, *args, **kwargs):
            self.busy_at_steps.append(engine.stats()["busy"])
            return decoder.steps(*args, **kwargs)

    spy = Spy()
    engine = serving.Engine(spy, run.params, detokenize=run.tokenizer.decode, max_queue=8).start()
    got, done = {}, threading.Semaphore(0)

    def deliver(update):
        got.setdefault(update.index, []).extend(update.tokens)
        if update.finish_reason or update.error:
            assert update.error is None, update.error
            done.release()

    def request(index, prompt):
        return serving.Request(prompt=run.tokenizer.encode(prompt), max_new=6, sampling=GREEDY, seed=0, index=index)

    spy.arrive_during_prefill = lambda: engine.submit([request(1, "say bcd")], deliver)
    try:
        engine.submit([request(0, "say abc")], deliver)
        assert done.acquire(timeout=60) and done.acquire(timeout=60), "the requests did not finish"
    finally:
        engine.stop()
    assert spy.busy_at_steps[0] == 2, f"busy slots at each decode call: {spy.busy_at_steps}"
    assert sorted(got) == [0, 1] and all(len(tokens) == 6 for tokens in got.values())
